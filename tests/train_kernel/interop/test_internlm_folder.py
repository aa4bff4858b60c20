"""InternLM checkpoint folders (model_tp{t}_pp{p}.pt) read into this model: shards of any tensor and
pipeline size merge to the same weights, the result gives transformers' logits on the same weights
(InternLM's convert2hf roles w1/w2/w3 = gate/up/down), GQA with InternLM's LLAMA2 names, and a
missing or damaged shard is an error naming the file."""

from __future__ import annotations

import pytest
import torch

from tests.train_kernel.interop.internlm_writer import (
    CONVERT2HF_LAYER,
    internlm_llama2_from_hf,
    internlm_v1_from_hf,
    write_internlm_folder,
)
from tests.train_kernel.model.helpers import run_single, small_config
from train_kernel.interop.commands import import_internlm
from train_kernel.interop.internlm_folder import read_internlm_folder
from train_kernel.model import InternLM, load_model_state

transformers = pytest.importorskip("transformers")

LAYERS, HIDDEN, HEADS, VOCAB, INNER = 3, 64, 4, 300, 256


def hf_llama(kv_heads: int = HEADS, bias: bool = True, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INNER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        attention_bias=bias,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # unit-scale weights, biases and norms away from their init: a wrong mapping shows
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
            else:
                param.add_(0.3 * torch.randn_like(param))
    return model


def model_config(**overrides):
    return small_config(
        **{"num_layers": LAYERS, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5, **overrides}
    )


def our_logits(config, state, tokens):
    model = InternLM(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return run_single(model, tokens)


TOKENS = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def v1_source():
    hf = hf_llama()
    with torch.no_grad():
        expected = hf(TOKENS.view(1, -1)).logits[0]
    return internlm_v1_from_hf(hf.state_dict(), LAYERS), expected


def test_tp2_pp2_and_single_shard_give_the_same_model_and_transformers_logits(tmp_path, v1_source):
    internlm_state, expected = v1_source
    config = model_config()
    write_internlm_folder(tmp_path / "one", internlm_state, LAYERS, HEADS, tp=1, pp=1)
    files = write_internlm_folder(tmp_path / "four", internlm_state, LAYERS, HEADS, tp=2, pp=2)
    assert sorted(p.name for p in files) == [f"model_tp{t}_pp{p}.pt" for t in (0, 1) for p in (0, 1)]
    whole = read_internlm_folder(tmp_path / "one", config)
    sharded = read_internlm_folder(tmp_path / "four", config)
    assert whole.keys() == sharded.keys()
    for key in whole:
        assert torch.equal(whole[key], sharded[key]), key
    torch.testing.assert_close(our_logits(config, sharded, TOKENS), expected, atol=1e-4, rtol=0)


def test_mlp_roles_follow_convert2hf(tmp_path, v1_source):
    internlm_state, _ = v1_source
    write_internlm_folder(tmp_path, internlm_state, LAYERS, HEADS)
    state = read_internlm_folder(tmp_path, model_config())
    hf = hf_llama().state_dict()
    roles = {k: v for k, v in CONVERT2HF_LAYER.items() if k.startswith("mlp.")}
    assert roles == {
        "mlp.w1.weight": "mlp.gate_proj.weight",
        "mlp.w2.weight": "mlp.up_proj.weight",
        "mlp.w3.weight": "mlp.down_proj.weight",
    }
    for ours, theirs in roles.items():
        assert torch.equal(state[f"layers.1.{ours}"], hf[f"model.layers.1.{theirs}"]), ours
    assert state["layers.0.mlp.w3.weight"].shape == (HIDDEN, INNER)  # down: back to hidden


def test_gqa_with_llama2_names_on_two_tensor_ranks(tmp_path):
    hf = hf_llama(kv_heads=2, bias=False, seed=1)
    with torch.no_grad():
        expected = hf(TOKENS.view(1, -1)).logits[0]
    write_internlm_folder(
        tmp_path, internlm_llama2_from_hf(hf.state_dict(), LAYERS), LAYERS, HEADS, tp=2, pp=3
    )
    # HF's row layout in InternLM's LLAMA2 names: what InternLM's LLAMA2 with adapt_hf=True holds.
    config = model_config(num_kv_attention_heads=2, model_type="LLAMA2", adapt_hf=True)
    state = read_internlm_folder(tmp_path, config)
    assert state["layers.0.attention.Wqkv.weight"].shape == ((HEADS + 2 * 2) * HIDDEN // HEADS, HIDDEN)
    assert torch.all(state["layers.2.attention.Wqkv.bias"] == 0)
    torch.testing.assert_close(our_logits(config, state, TOKENS), expected, atol=1e-4, rtol=0)


def test_import_internlm_writes_a_checkpoint_of_this_project(tmp_path, v1_source):
    internlm_state, expected = v1_source
    write_internlm_folder(tmp_path / "internlm", internlm_state, LAYERS, HEADS, tp=2, pp=1)
    config = model_config(dtype="torch.bfloat16")
    import_internlm(f"local:{tmp_path / 'internlm'}", config, tmp_path / "ours")
    loaded, state = load_model_state(tmp_path / "ours")
    assert loaded == config and all(v.dtype == torch.bfloat16 for v in state.values())


def test_missing_and_damaged_shards_name_the_file(tmp_path, v1_source):
    internlm_state, _ = v1_source
    write_internlm_folder(tmp_path, internlm_state, LAYERS, HEADS, tp=2, pp=2)
    config = model_config()
    (tmp_path / "model_tp1_pp1.pt").write_bytes((tmp_path / "model_tp1_pp1.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"model_tp1_pp1\.pt: unreadable weights file"):
        read_internlm_folder(tmp_path, config)
    (tmp_path / "model_tp1_pp0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_tp1_pp0\.pt is missing"):
        read_internlm_folder(tmp_path, config)


def test_a_config_of_another_shape_is_an_error(tmp_path, v1_source):
    internlm_state, _ = v1_source
    write_internlm_folder(tmp_path, internlm_state, LAYERS, HEADS, tp=1, pp=2)
    with pytest.raises(ValueError, match=r"model_config.pt: num_layers is 3, but model.num_layers gives 2"):
        read_internlm_folder(tmp_path, small_config(vocab_size=VOCAB))
    (tmp_path / "model_config.pt").unlink()  # optional: then the weights tell
    with pytest.raises(ValueError, match="holds 3 layers, model.num_layers is 2"):
        read_internlm_folder(tmp_path, small_config(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="shape"):
        read_internlm_folder(tmp_path, model_config(vocab_size=320))


def test_import_internlm_command(tmp_path, v1_source):
    from click.testing import CliRunner

    from tests.train_kernel.train.tiny_config import tiny_config_text
    from train_kernel.cli import main

    internlm_state, expected = v1_source
    write_internlm_folder(tmp_path / "internlm", internlm_state, LAYERS, HEADS, tp=2, pp=2)
    (tmp_path / "tiny.py").write_text(tiny_config_text(tmp_path / "run"))
    args = [
        "import-internlm",
        "--ckpt",
        f"local:{tmp_path / 'internlm'}",
        "--config",
        str(tmp_path / "tiny.py"),
    ]
    args += ["--set", f"model.num_layers={LAYERS}", "--set", "model.layer_norm_epsilon=1e-5"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    config, state = load_model_state(tmp_path / "ours")
    torch.testing.assert_close(our_logits(config, state, TOKENS), expected, atol=1e-4, rtol=0)
