"""Weight files of our checkpoint layout, and conversion to/from Hugging Face Llama checkpoints
checked against transformers' own LlamaForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_kernel.model.helpers import lively, run_single, small_model
from train_kernel.model import InternLM, load_model_state, save_model_checkpoint
from train_kernel.model.hf_interop import export_hf, import_hf
from train_kernel.model.state_files import write_model_state

transformers = pytest.importorskip("transformers")


def hf_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens.view(1, -1)).logits[0]


def test_stage_files_merge_into_the_full_state(tmp_path):
    model = small_model()
    full = model.state_dict()
    first, last = InternLM(model.config), InternLM(model.config)
    first.load_state_dict(full)
    last.load_state_dict(full)
    del first.layers["1"]
    first.norm = first.head = None
    del last.layers["0"]
    last.embedding = None
    save_model_checkpoint(first, tmp_path, pipeline_stage=0)
    save_model_checkpoint(last, tmp_path, pipeline_stage=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_config.json",
        "model_tp0_pp0.safetensors",
        "model_tp0_pp1.safetensors",
    ]
    config, state = load_model_state(tmp_path)
    assert config == model.config
    assert list(state) == list(full) or sorted(state) == sorted(full)
    for key, tensor in full.items():
        assert torch.equal(state[key], tensor), key


def test_load_names_missing_weights(tmp_path):
    model = small_model()
    state = model.state_dict()
    del state["layers.1.mlp.w2.weight"]
    write_model_state(model.config, state, tmp_path)
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.w2.weight'\]"):
        load_model_state(tmp_path)


def test_exported_checkpoint_gives_our_logits_in_transformers(tmp_path):
    model = lively(small_model(layer_norm_epsilon=1e-6, rope_base=50000.0)).eval()
    save_model_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_position_embeddings=4096)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (
        hf_config["attention_bias"] is True and hf_config["intermediate_size"] == model.config.mlp_hidden_size
    )

    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = run_single(model, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-4, rtol=0)


def test_import_of_export_round_trips_exactly(tmp_path):
    model = lively(small_model(dtype="torch.bfloat16", rope_base=20000.0))
    save_model_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    config = import_hf(tmp_path / "hf", tmp_path / "back")

    loaded_config, state = load_model_state(tmp_path / "back")
    assert loaded_config == config
    for field in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "dtype", "rope_base"):
        assert getattr(config, field) == getattr(model.config, field), field
    assert config.mlp_hidden_size == model.config.mlp_hidden_size
    for key, tensor in model.state_dict().items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def test_import_of_a_bias_free_tied_llama(tmp_path):
    hf_config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        attention_bias=False,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    config = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert config.mlp_hidden_size == 256 and config.torch_dtype == torch.float32

    _, state = load_model_state(tmp_path / "ckpt")
    assert torch.all(state["layers.0.attention.Wqkv.bias"] == 0)
    assert torch.equal(state["head.weight"], state["embedding.weight"])
    model = InternLM(config).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = run_single(model, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-4, rtol=0)


def test_export_refuses_what_llama_cannot_express(tmp_path):
    save_model_checkpoint(small_model(norm_type="layernorm"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="norm_type"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")


def test_grouped_query_attention_exports_and_imports(tmp_path):
    model = lively(
        small_model(num_kv_attention_heads=2, rope_base=500000.0, max_position_embeddings=8192)
    ).eval()
    save_model_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (
        hf_config["num_key_value_heads"],
        hf_config["rope_theta"],
        hf_config["max_position_embeddings"],
    ) == (
        2,
        500000.0,
        8192,
    )
    tokens = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = run_single(model, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, atol=1e-4, rtol=0)
    config = import_hf(tmp_path / "hf", tmp_path / "back")
    for field in (
        "num_kv_attention_heads",
        "rope_base",
        "max_position_embeddings",
        "qkv_size",
        "mlp_hidden_size",
    ):
        assert getattr(config, field) == getattr(model.config, field), field


def test_new_model_keys_are_checked():
    from train_kernel.config import ConfigError

    with pytest.raises(ConfigError, match="model.num_kv_attention_heads"):
        small_model(num_kv_attention_heads=3)
    # use_dynamic_ntk_rope is implemented now (test_dynamic_ntk.py); LLAMA2's keys need its model_type.
    with pytest.raises(ConfigError, match="model.no_bias"):
        small_model(no_bias=True)
