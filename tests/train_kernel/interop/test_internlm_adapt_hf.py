"""An InternLM LLAMA2 folder whose model_config.pt names adapt_hf=False, read by a run that sets
model.adapt_hf=True: an error naming the file and the key, not the run's key silently overruled."""

from __future__ import annotations

import pytest
import torch

from tests.train_kernel.interop.internlm_writer import internlm_llama2_from_hf, write_internlm_folder
from tests.train_kernel.model.helpers import small_config
from train_kernel.interop.internlm_folder import read_internlm_folder
from train_kernel.model import build_model
from train_kernel.model.hf_interop import hf_state_from_ours


def _folder(tmp_path, adapt_hf: bool):
    config = small_config(model_type="LLAMA2", no_bias=True)
    hf = hf_state_from_ours(config, build_model(config, seed=0).state_dict())
    write_internlm_folder(tmp_path, internlm_llama2_from_hf(hf, config.num_layers), config.num_layers, 4)
    torch.save({"num_layers": config.num_layers, "adapt_hf": adapt_hf}, tmp_path / "model_config.pt")
    return config


def test_a_run_saying_adapt_hf_against_its_folder_is_an_error(tmp_path):
    config = _folder(tmp_path, adapt_hf=False)
    read_internlm_folder(tmp_path, config)  # the run leaves adapt_hf alone: the folder's False
    with pytest.raises(ValueError, match=r"model_config\.pt: adapt_hf is False.*model\.adapt_hf=True"):
        read_internlm_folder(tmp_path, config.__class__(**{**config.to_json(), "adapt_hf": True}))


def test_a_run_agreeing_with_its_folder_reads_it(tmp_path):
    config = _folder(tmp_path, adapt_hf=True)
    state = read_internlm_folder(tmp_path, config.__class__(**{**config.to_json(), "adapt_hf": True}))
    assert "layers.0.attention.Wqkv.weight" in state
