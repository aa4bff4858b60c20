"""The init stds with use_scaled_init=False, against InternLM's reset_parameters
(internlm/model/modeling_internlm.py: an unscaled out_proj is N(0, 0.0015), w2 N(0, 0.006);
modeling_llama.py: wo and w2 take attn_other_init_std and ffn_other_init_std as they are)."""

from __future__ import annotations

import pytest

from tests.train_kernel.model.helpers import small_config
from train_kernel.model import build_model
from train_kernel.model.internlm import init_std


def test_internlm_without_scaled_init_draws_internlms_unscaled_stds():
    config = small_config(use_scaled_init=False)
    assert init_std("layers.1.attention.out_proj.weight", config) == 0.0015
    assert init_std("layers.1.mlp.w2.weight", config) == 0.006
    scaled = small_config()
    assert init_std("layers.1.attention.out_proj.weight", scaled) == pytest.approx(0.006 / 2)
    assert init_std("layers.1.mlp.w2.weight", scaled) == pytest.approx(0.006 / 2)
    state = build_model(small_config(use_scaled_init=False, hidden_size=256), seed=0).state_dict()
    assert state["layers.0.attention.out_proj.weight"].std().item() == pytest.approx(0.0015, rel=0.05)
    assert state["layers.0.mlp.w2.weight"].std().item() == pytest.approx(0.006, rel=0.05)


def test_llama2_without_scaled_init_takes_its_keys_as_they_are():
    config = small_config(
        model_type="LLAMA2", use_scaled_init=False, attn_other_init_std=0.03, ffn_other_init_std=0.04
    )
    assert init_std("layers.1.attention.out_proj.weight", config) == 0.03
    assert init_std("layers.1.mlp.w2.weight", config) == 0.04
