"""Model weights written by other programs, read into this project's full state dict.

- internlm_folder: InternLM's checkpoint folders (`model_tp{t}_pp{p}.pt`, any tp and pp, v1 and
  LLAMA2 key names), tensor-parallel shards merged as InternLM splits them.
- meta_llama: Meta's Llama releases (`consolidated.{t}.pth` + params.json).
- Hugging Face Llama folders: train_kernel.model.hf_interop.
- foreign: `load_ckpt_info=dict(ckpt_type=...)` and the CLI pick one of them here.
"""
