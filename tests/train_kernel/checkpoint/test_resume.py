"""Saving and resuming in one process: the checkpoint folder's contents, exact (bit-identical fp32)
resume from a step folder and from a snapshot, auto_resume past incomplete and damaged checkpoints,
content selection, weights-only starts, and clear errors for checkpoints of another layout."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_kernel.checkpoint.helpers import config_text, losses_by_step, train_records
from train_kernel.checkpoint.manifest import CheckpointError
from train_kernel.config import config_from_text
from train_kernel.train.trainer import train

EXPECTED_FILES = {
    "6.step",
    "config.py",
    "context.json",
    "manifest.json",
    "model_config.json",
    "model_tp0_pp0.safetensors",
    "optimizer_index_tp0_pp0.json",
    "optimizer_tp0_pp0_zo0.pt",
    "rng_tp0_pp0_dp0.pt",
    "sampler.json",
    "scheduler.json",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run saving every 2 steps, snapshots every step in between."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(config_from_text(config_text(run_dir)))
    return run_dir


def _resumed(tmp_path, reference, extra: str, **overrides):
    run_dir = tmp_path / "resumed"
    train(config_from_text(config_text(run_dir, extra=extra, **overrides)))
    return run_dir


def test_checkpoint_folder_holds_every_part_and_a_true_manifest(reference):
    folder = reference / "ckpt" / "6"
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == EXPECTED_FILES - {"6.step", "manifest.json"}
    for name, entry in listed.items():
        assert (folder / name).stat().st_size == entry["size"], name
    assert manifest["step"] == 6 and manifest["layout"]["data"] == 1
    # Optimizer and RNG files load without pickle code.
    state = torch.load(folder / "optimizer_tp0_pp0_zo0.pt", weights_only=True)
    assert state["master"].dtype == torch.float32 and state["partition"] == [0, state["numel"]]
    assert json.loads((folder / "context.json").read_text())["batch_count"] == 6


def test_snapshots_alternate_between_two_slots(reference):
    snapshots = reference / "ckpt" / "snapshot"
    markers = {slot: sorted(p.name for p in (snapshots / slot).glob("*.step")) for slot in ("0", "1")}
    # Snapshots every step (checkpoint_every // 2), none on checkpoint steps: 1, 3 and 5 take the
    # slots in turn (1 -> 1, 3 -> 0, 5 -> 1): the two newest snapshots survive.
    assert markers == {"0": ["3.step"], "1": ["5.step"]}


def test_resume_from_a_step_folder_is_bit_identical(tmp_path, reference):
    run_dir = _resumed(tmp_path, reference, f"\nckpt['load_ckpt_folder'] = 'local:{reference}/ckpt/2'\n")
    expected = {r["step"]: r for r in train_records(reference)}
    got = train_records(run_dir)
    assert [r["step"] for r in got] == [2, 3, 4, 5]
    for record in got:
        want = expected[record["step"]]
        for field in ("loss", "grad_norm", "lr", "num_consumed_tokens", "acc", "adam_beta2"):
            assert record[field] == want[field], (record["step"], field)


def test_auto_resume_skips_incomplete_and_falls_back_past_a_corrupt_checkpoint(tmp_path, reference, capsys):
    import shutil

    save = tmp_path / "resumed" / "ckpt"
    shutil.copytree(reference / "ckpt", save)
    (save / "6" / "6.step").unlink()  # the run died while writing step 6
    blob = save / "snapshot" / "1" / "optimizer_tp0_pp0_zo0.pt"  # the snapshot of step 5
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    blob.write_bytes(bytes(data))
    run_dir = _resumed(tmp_path, reference, "\nckpt['auto_resume'] = True\n")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "ckpt/6: no 6.step marker" in out
    assert "optimizer_tp0_pp0_zo0.pt does not match its sha256" in out and "falling back" in out
    assert train_records(run_dir)[0]["step"] == 4  # resumed from the intact checkpoint 4
    reference_losses = losses_by_step(reference)
    for step, values in losses_by_step(run_dir).items():
        assert values == reference_losses[step], step


def test_model_only_start_and_content_selection(tmp_path, reference):
    run_dir = _resumed(
        tmp_path, reference, f"\nckpt['load_model_only_folder'] = 'local:{reference}/ckpt/4'\n"
    )
    got = train_records(run_dir)
    assert got[0]["step"] == 0 and len(got) == 6  # fresh schedule and data, trained weights
    assert got[0]["loss"] != train_records(reference)[0]["loss"]
    second = tmp_path / "second"
    text = config_text(
        second,
        extra=(
            f"\nckpt['load_ckpt_info'] = dict(path='local:{reference}/ckpt/4', "
            "content=('model', 'sampler', 'scheduler'))\n"
        ),
    )
    train(config_from_text(text))
    records = train_records(second)
    assert [r["step"] for r in records] == [4, 5]
    # Fresh Adam moments: not the uninterrupted run's loss after the first update.
    assert records[0]["loss"] == train_records(reference)[4]["loss"]
    assert records[1]["loss"] != train_records(reference)[5]["loss"]


def test_a_named_checkpoint_that_is_damaged_or_foreign_is_an_error(tmp_path, reference):
    import shutil

    folder = tmp_path / "foreign"
    shutil.copytree(reference / "ckpt" / "4", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = "deepspeed/zero"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="another layout"):
        train(
            config_from_text(
                config_text(tmp_path / "x", extra=f"\nckpt['load_ckpt_folder'] = 'local:{folder}'\n")
            )
        )
    (folder / "model_tp0_pp0.safetensors").unlink()
    (folder / "manifest.json").write_bytes((reference / "ckpt" / "4" / "manifest.json").read_bytes())
    with pytest.raises(CheckpointError, match="model_tp0_pp0.safetensors is missing"):
        train(
            config_from_text(
                config_text(tmp_path / "y", extra=f"\nckpt['load_ckpt_folder'] = 'local:{folder}'\n")
            )
        )
    with pytest.raises(CheckpointError, match="no manifest.json"):
        train(
            config_from_text(
                config_text(
                    tmp_path / "z", extra=f"\nckpt['load_ckpt_folder'] = 'local:{tmp_path}/nothing'\n"
                )
            )
        )


def test_another_model_shape_names_the_weight(tmp_path, reference):
    text = config_text(tmp_path / "wide", extra=f"\nckpt['load_ckpt_folder'] = 'local:{reference}/ckpt/4'\n")
    text = text.replace("hidden_size=64", "hidden_size=32")
    with pytest.raises(CheckpointError, match="shape"):
        train(config_from_text(text))


def test_auto_resume_falls_back_past_a_checkpoint_with_a_deleted_file(tmp_path, reference, capsys):
    import shutil

    save = tmp_path / "resumed" / "ckpt"
    shutil.copytree(reference / "ckpt", save)
    (save / "6" / "sampler.json").unlink()  # marker and manifest intact, one file gone
    run_dir = _resumed(tmp_path, reference, "\nckpt['auto_resume'] = True\ndata['total_steps'] = 8\n")
    out = capsys.readouterr().out
    assert "ckpt/6: sampler.json is missing" in out and "falling back" in out
    assert train_records(run_dir)[0]["step"] == 5  # the step-5 snapshot, newest intact


def test_load_optimizer_false_resumes_weights_data_and_schedule_with_fresh_moments(tmp_path, reference):
    extra = f"\nckpt['load_ckpt_folder'] = 'local:{reference}/ckpt/4'\nckpt['load_optimizer'] = False\n"
    run_dir = _resumed(tmp_path, reference, extra)
    got, want = train_records(run_dir), train_records(reference)
    assert [r["step"] for r in got] == [4, 5]
    assert got[0]["loss"] == want[4]["loss"]  # same weights and batch
    assert got[1]["loss"] != want[5]["loss"]  # but Adam started over
