"""model_type "LLAMA2" (InternLM's modeling_llama): the config keys, a model without attention biases
(no_bias) that gives transformers' LlamaForCausalLM (attention_bias=False) logits after export-hf and
after import-hf, InternLM LLAMA2 folders in both of adapt_hf's row layouts, checkpoints recording it
(and older ones read as INTERNLM), InternLM's LLAMA2 initialisation keys, and plan's counts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.train_kernel.interop.internlm_writer import internlm_llama2_from_hf, write_internlm_folder
from tests.train_kernel.model.helpers import lively, packed_batch, run_single, small_config
from train_kernel.config import ConfigError, config_from_text
from train_kernel.interop.internlm_folder import read_internlm_folder
from train_kernel.model import InternLM, build_model, load_model_state, save_model_checkpoint
from train_kernel.model.hf_interop import export_hf, import_hf
from train_kernel.plan import analytic_parameter_count, analytic_parameter_counts, make_plan, render

HEADS, KV_HEADS, LAYERS = 4, 2, 2
TOKENS = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3))


def llama2(**overrides):
    fields = dict(model_type="LLAMA2", no_bias=True, num_kv_attention_heads=KV_HEADS, layer_norm_epsilon=1e-6)
    return small_config(**{**fields, **overrides})


def logits(config, state):
    model = InternLM(config).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return run_single(model, TOKENS)


def test_no_bias_model_has_no_attention_biases_and_plan_counts_it():
    model = build_model(llama2(), device="meta")
    names = [name for name, _ in model.named_parameters()]
    assert not [name for name in names if name.endswith(".bias")]
    assert analytic_parameter_count(model.config) == sum(p.numel() for p in model.parameters())
    biased = build_model(llama2(no_bias=False), device="meta")
    assert analytic_parameter_count(biased.config) == sum(p.numel() for p in biased.parameters())
    # Tensor 2: each rank's share, no bias terms either.
    counts = analytic_parameter_counts(llama2(), tensor=2)
    qkv = (HEADS + 2 * KV_HEADS) * 16
    assert counts.per_layer == qkv // 2 * 64 + 32 * 64 + 3 * 128 * 64 + 2 * 64


LLAMA2_TEXT = """
model_type = "LLAMA2"
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300, no_bias=True,
             num_kv_attention_heads=2, adapt_hf=True, embedding_init_std=0.05, init_type="uniform")
"""


def test_config_file_takes_llama2_and_its_keys():
    config = config_from_text(LLAMA2_TEXT)
    assert config.model_type == config.model.model_type == "LLAMA2"
    assert config.model.no_bias and config.model.adapt_hf and config.model.embedding_init_std == 0.05
    plan = make_plan(config, world_size=1)
    assert plan.parameters == sum(p.numel() for p in build_model(config.model, device="meta").parameters())
    assert "LLAMA2 (no attention biases), 2 layers" in render(plan)


@pytest.mark.parametrize(
    "text, key",
    [
        # LLAMA2's keys under INTERNLM (InternLM's INTERNLM builder does not take them).
        (LLAMA2_TEXT.replace('"LLAMA2"', '"INTERNLM"'), "model.no_bias"),
        ("model = dict(attn_other_init_std=0.01)\n", "model.attn_other_init_std"),
        ('model_type = "LLAMA2"\nmodel = dict(init_type="xavier")\n', "model.init_type"),
        ('model_type = "LLAMA2"\nmodel = dict(out_head_init_std=0)\n', "model.out_head_init_std"),
        ('model = dict(model_type="LLAMA2")\n', "model.model_type"),  # InternLM's place: the top level
        ('model_type = "LLAMA"\n', "model_type"),
    ],
)
def test_keys_that_do_not_map_are_errors_naming_them(text, key):
    with pytest.raises(ConfigError) as caught:
        config_from_text(text)
    assert caught.value.key == key, str(caught.value)


def test_llama2_initialisation_follows_internlms_keys():
    model = build_model(llama2(num_layers=4, hidden_size=256, vocab_size=2000), seed=0)
    state = model.state_dict()
    assert state["embedding.weight"].std().item() == pytest.approx(0.02, rel=0.05)  # InternLM's default
    assert state["head.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    # wo and w2 scaled by 1/sqrt(2 (layer + 1)); w1 and w3 take ffn_uplayer_init_std (InternLM, by name).
    assert state["layers.3.attention.out_proj.weight"].std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert state["layers.3.mlp.w2.weight"].std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    custom = llama2(
        num_layers=1,
        hidden_size=256,
        embedding_init_std=0.1,
        ffn_uplayer_init_std=0.05,
        use_scaled_init=False,
        attn_other_init_std=0.03,
        init_type="uniform",
    )
    state = build_model(custom, seed=0).state_dict()
    bound = (3 * 0.1) ** 0.5  # InternLM's uniform_: U(-sqrt(3 std), sqrt(3 std))
    assert state["embedding.weight"].abs().max().item() == pytest.approx(bound, rel=0.01)
    assert state["layers.0.mlp.w3.weight"].abs().max().item() == pytest.approx((3 * 0.05) ** 0.5, rel=0.01)
    assert state["layers.0.attention.out_proj.weight"].abs().max().item() == pytest.approx(
        (3 * 0.03) ** 0.5, rel=0.01
    )


def test_checkpoint_records_the_model_type_and_old_files_read_as_internlm(tmp_path):
    model = build_model(llama2(), seed=1)
    save_model_checkpoint(model, tmp_path / "new")
    written = json.loads((tmp_path / "new" / "model_config.json").read_text())
    assert written["model_type"] == "LLAMA2" and written["no_bias"] is True
    config, state = load_model_state(tmp_path / "new")
    assert config == model.config and state.keys() == model.state_dict().keys()
    # A file from before these keys: an INTERNLM model with biases, as it was.
    old = build_model(small_config(), seed=1)
    save_model_checkpoint(old, tmp_path / "old")
    path = tmp_path / "old" / "model_config.json"
    data = json.loads(path.read_text())
    for key in ("model_type", "no_bias", "adapt_hf", "init_type", "use_scaled_init", "embedding_init_std"):
        del data[key]
    path.write_text(json.dumps(data))
    config, state = load_model_state(tmp_path / "old")
    assert config.model_type == "INTERNLM" and "layers.0.attention.Wqkv.bias" in state


transformers = pytest.importorskip("transformers")


def hf_llama(bias: bool = False, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        attention_bias=bias,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # unit-scale weights: a wrong mapping shows in the logits
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
            else:
                param.add_(0.3 * torch.randn_like(param))
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS.view(1, -1)).logits[0]


def test_export_hf_of_a_no_bias_model_loads_in_transformers_with_the_same_logits(tmp_path):
    model = lively(InternLM(llama2())).eval()
    save_model_checkpoint(model, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_bias"] is False
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        assert not [key for key in handle.keys() if key.endswith(".bias")]  # noqa: SIM118
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = run_single(model, TOKENS)
    torch.testing.assert_close(hf_logits(hf), ours, atol=1e-4, rtol=0)


def test_import_hf_as_llama2_invents_no_biases(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    config = import_hf(tmp_path / "hf", tmp_path / "ours", model_type="LLAMA2")
    assert config.model_type == "LLAMA2" and config.no_bias
    loaded, state = load_model_state(tmp_path / "ours")
    assert loaded == config and not [key for key in state if key.endswith(".bias")]
    torch.testing.assert_close(logits(config, state), hf_logits(hf), atol=1e-4, rtol=0)
    # INTERNLM (the default) keeps its biases, at zero.
    config = import_hf(tmp_path / "hf", tmp_path / "internlm")
    _, state = load_model_state(tmp_path / "internlm")
    assert config.has_attention_bias and torch.all(state["layers.0.attention.Wqkv.bias"] == 0)
    # A checkpoint with biases keeps them as LLAMA2 (no_bias=False).
    biased = hf_llama(bias=True)
    biased.save_pretrained(tmp_path / "biased")
    config = import_hf(tmp_path / "biased", tmp_path / "biased_ours", model_type="LLAMA2")
    assert not config.no_bias
    _, state = load_model_state(tmp_path / "biased_ours")
    torch.testing.assert_close(logits(config, state), hf_logits(biased), atol=1e-4, rtol=0)


def meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows -> Meta's interleaved pairs, per head: the layout InternLM's
    LLAMA2 (adapt_hf=False) holds after load_llama_pretrained_weights of Meta's files."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_internlm_llama2_folders_load_into_llama2_in_both_row_layouts(tmp_path):
    hf = hf_llama(seed=2)
    expected = hf_logits(hf)
    hf_layout = internlm_llama2_from_hf(hf.state_dict(), LAYERS)
    meta_layout = dict(hf_layout)
    for i in range(LAYERS):
        for name, heads in (("wq", HEADS), ("wk", KV_HEADS)):
            key = f"layers.{i}.attention.{name}.weight"
            meta_layout[key] = meta_rows(hf_layout[key], heads)
    config = llama2()
    # InternLM's default adapt_hf=False: Meta's rows, tensor 2 x pipeline 2.
    write_internlm_folder(tmp_path / "meta", meta_layout, LAYERS, HEADS, tp=2, pp=2)
    state = read_internlm_folder(tmp_path / "meta", config)
    assert not [key for key in state if key.endswith(".bias")]
    torch.testing.assert_close(logits(config, state), expected, atol=1e-4, rtol=0)
    # adapt_hf=True saved in the folder's model_config.pt (InternLM saves its model section there).
    write_internlm_folder(tmp_path / "hf_rows", hf_layout, LAYERS, HEADS)
    torch.save({"num_layers": LAYERS, "adapt_hf": True}, tmp_path / "hf_rows" / "model_config.pt")
    state = read_internlm_folder(tmp_path / "hf_rows", config)
    torch.testing.assert_close(logits(config, state), expected, atol=1e-4, rtol=0)
    # Read with the other layout, the same weights are another model: the layout matters.
    wrong = read_internlm_folder(tmp_path / "meta", llama2(adapt_hf=True))
    assert (logits(config, wrong) - expected).abs().max() > 1e-2


def test_no_bias_refuses_a_folder_with_biases(tmp_path):
    hf = hf_llama(bias=True)
    state = internlm_llama2_from_hf(hf.state_dict(), LAYERS)
    for i in range(LAYERS):
        state[f"layers.{i}.attention.wo.bias"] = hf.state_dict()[f"model.layers.{i}.self_attn.o_proj.bias"]
    write_internlm_folder(tmp_path, state, LAYERS, HEADS)
    with pytest.raises(ValueError, match=r"holds attention biases .* model.no_bias=True would drop them"):
        read_internlm_folder(tmp_path, llama2())


def test_pipeline_stages_of_a_bias_free_model_compose_to_the_whole():
    # Dynamic NTK past max_position_embeddings too: every stage rescales from the same positions.
    config = llama2(num_layers=4, use_dynamic_ntk_rope=True, max_position_embeddings=8)
    model = lively(InternLM(config)).eval()
    batch = packed_batch([[12, 4], [16]])[:3]
    first, last = InternLM(config).eval(), InternLM(config).eval()
    first.load_state_dict(model.state_dict())
    last.load_state_dict(model.state_dict())
    for name in ("2", "3"):
        del first.layers[name]
    for name in ("0", "1"):
        del last.layers[name]
    first.norm = first.head = last.embedding = None
    with torch.no_grad():
        hidden = first(*batch)
        torch.testing.assert_close(last(hidden, *batch[1:]), model(*batch), rtol=0, atol=0)


def test_cli_round_trip_keeps_a_llama2_model(tmp_path):
    from click.testing import CliRunner

    from train_kernel.cli import main

    model = build_model(llama2(), seed=3)
    save_model_checkpoint(model, tmp_path / "ck")
    ck, hf, back = (str(tmp_path / name) for name in ("ck", "hf", "back"))
    result = CliRunner().invoke(main, ["export-hf", "--ckpt", ck, "--out", hf])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["import-hf", "--hf", hf, "--out", back, "--model-type", "LLAMA2"])
    assert result.exit_code == 0, result.output
    config, state = load_model_state(tmp_path / "back")
    assert config.model_type == "LLAMA2" and config.no_bias
    assert state.keys() == model.state_dict().keys()
    assert all(state[key].equal(value) for key, value in model.state_dict().items())
