"""`load_ckpt_info=dict(path=..., content=("model",), ckpt_type=...)` with weights written by
InternLM (a tp=2 x pp=2 folder of model_tp*_pp*.pt) starts a run from the same weights as this
project's own weights-only folder of them; asking such a folder for more than the model is an error."""

from __future__ import annotations

import pytest

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from tests.train_kernel.interop.internlm_writer import write_internlm_folder
from tests.train_kernel.model.helpers import lively, small_model
from train_kernel.checkpoint.manifest import CheckpointError
from train_kernel.config import config_from_text
from train_kernel.model import save_model_checkpoint
from train_kernel.train.trainer import train

_V1_LAYER = {
    "attention.Wqkv.weight": "mixer.Wqkv.weight",
    "attention.Wqkv.bias": "mixer.Wqkv.bias",
    "attention.out_proj.weight": "mixer.out_proj.weight",
    "attention.out_proj.bias": "mixer.out_proj.bias",
    "attention_norm.weight": "norm1.weight",
    "mlp_norm.weight": "norm2.weight",
    "mlp.w1.weight": "mlp.w1.weight",
    "mlp.w2.weight": "mlp.w2.weight",
    "mlp.w3.weight": "mlp.w3.weight",
}


def _internlm_names(state):
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            out[f"blocks.{i}.{_V1_LAYER[rest]}"] = value
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny config's model with lively weights, as an InternLM folder and as our own folder."""
    root = tmp_path_factory.mktemp("weights")
    model = lively(small_model(vocab_size=300), seed=11)
    write_internlm_folder(root / "internlm", _internlm_names(model.state_dict()), 2, 4, tp=2, pp=2)
    save_model_checkpoint(model, root / "ours")
    return root


def _load_info(folder, content: tuple[str, ...]) -> str:
    return (
        f"\nckpt['load_ckpt_info'] = dict(path='local:{folder}', content={content!r}, ckpt_type='internlm')\n"
    )


def _first_losses(run_dir, extra: str) -> list[float]:
    train(config_from_text(config_text(run_dir, save=False, total_steps=2, extra=extra)))
    return [record["loss"] for record in train_records(run_dir)]


def test_internlm_folder_starts_the_run_from_its_weights(tmp_path, weights):
    internlm = _first_losses(
        tmp_path / "a",
        _load_info(weights / "internlm", ("model",)),
    )
    ours = _first_losses(tmp_path / "b", f"\nckpt['load_model_only_folder'] = 'local:{weights}/ours'\n")
    fresh = _first_losses(tmp_path / "c", "")
    assert internlm == ours
    assert internlm[0] != fresh[0]


def test_more_than_the_model_from_an_internlm_folder_is_an_error(tmp_path, weights):
    extra = _load_info(weights / "internlm", ("all",))
    with pytest.raises(
        CheckpointError, match=r"holds model weights only; load it with content=\(\"model\",\)"
    ):
        _first_losses(tmp_path / "d", extra)
