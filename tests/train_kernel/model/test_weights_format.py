"""Checkpoints written before the MLP names took InternLM's meaning (w2 = up, w3 = down): their
model_config.json has no weights_format and rotary_base instead of rope_base; they load with the
same function as before, and the model computes what it computed then."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train_kernel.model.helpers import lively, run_single, small_model
from train_kernel.model import InternLM, load_model_state, save_model_checkpoint
from train_kernel.model.config import WEIGHTS_FORMAT, model_config_from_json


def _rewrite_as_format_1(folder) -> None:
    """What the earlier version wrote: down projection under mlp.w2, up under mlp.w3."""
    path = folder / "model_tp0_pp0.safetensors"
    state = load_file(path)
    swapped = {}
    for key, value in state.items():
        if ".mlp.w2." in key:
            key = key.replace(".mlp.w2.", ".mlp.w3.")
        elif ".mlp.w3." in key:
            key = key.replace(".mlp.w3.", ".mlp.w2.")
        swapped[key] = value
    save_file(swapped, path)
    config = json.loads((folder / "model_config.json").read_text())
    del config["weights_format"]
    config["rotary_base"] = config.pop("rope_base")
    for key in ("num_kv_attention_heads", "max_position_embeddings", "use_dynamic_ntk_rope"):
        del config[key]
    (folder / "model_config.json").write_text(json.dumps(config))


def test_a_format_1_folder_loads_to_the_same_model(tmp_path):
    model = lively(small_model()).eval()
    save_model_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "model_config.json").read_text())["weights_format"] == WEIGHTS_FORMAT
    _rewrite_as_format_1(tmp_path)
    config, state = load_model_state(tmp_path)
    assert config == model.config
    again = InternLM(config).eval()
    again.load_state_dict(state)
    tokens = torch.arange(17) % 300
    with torch.no_grad():
        torch.testing.assert_close(run_single(again, tokens), run_single(model, tokens), atol=0, rtol=0)


def test_an_unknown_format_or_key_is_an_error():
    with pytest.raises(ValueError, match="weights_format 3 is unknown"):
        model_config_from_json({"weights_format": 3}, "x/model_config.json")
    with pytest.raises(ValueError, match=r"x/model_config.json: unknown model keys \['wat'\]"):
        model_config_from_json({"wat": 1}, "x/model_config.json")
