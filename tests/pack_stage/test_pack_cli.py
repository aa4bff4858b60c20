"""`pack-stage run` and `pack-stage inspect` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pack_stage.cli import main

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_args(folder, out, *extra):
    return ["run", "--input", folder.path, "--output", out, "--no-progress", *extra]


@pytest.fixture
def text_folder(make_token_folder):
    # Sorted keys put cn/ first: stream = <s>你好</s> (8) | <s>hello world</s> (13) | <s>second doc</s> (12).
    return make_token_folder({"en/a.jsonl": ["hello world", "second doc"], "cn/b.txt": [0, "你好"]})


def test_run_prints_the_summary(text_folder, tmp_path):
    result = invoke(
        *run_args(text_folder, tmp_path / "out", "--seq-len", 16, "--micro-bsz", 2, "--no-shuffle")
    )
    assert result.exit_code == 0, result.output
    assert "train: 2 rows, 3 documents, 33 tokens, 31 padding tokens" in result.output
    assert "dropped 1 documents" in result.output
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_inspect_shows_segments_text_masks_and_padding(text_folder, tmp_path):
    out = tmp_path / "out"
    assert (
        invoke(*run_args(text_folder, out, "--seq-len", 16, "--micro-bsz", 2, "--no-shuffle")).exit_code == 0
    )
    first = invoke("inspect", out, "--row", 0)
    assert first.exit_code == 0, first.output
    text = first.output
    assert "packed_length 32" in text and "padding fraction" in text
    assert "en: 2 documents, 25 tokens" in text
    assert "── segment 0: tokens [0, 8) length 8 ──" in text
    assert "── segment 1: tokens [8, 21) length 13 ──" in text
    assert "── segment 2: tokens [21, 32) length 11 ──" in text
    assert "cn/b.txt:4 (type cn)" in text  # the second row of cn/b.txt sits on line 4
    assert "en/a.jsonl:2 (type en)" in text
    assert "<s>你好</s>⟨-100⟩" in text
    assert "<s>hello world</s>⟨-100⟩" in text
    assert "<s>second doc" in text and "continues in the next segment/row" in text

    second = invoke("inspect", out, "--row", 1)
    assert second.exit_code == 0, second.output
    assert "</s>⟨-100⟩" in second.output and "continued from the previous segment/row" in second.output
    assert "── segment 1: tokens [1, 17) length 16 ──" in second.output
    assert "padding: 16 x <pad>" in second.output and "padding: 15 x <pad>" in second.output


def test_inspect_pack_sample_into_one_shows_documents_inside_a_segment(text_folder, tmp_path):
    out = tmp_path / "out"
    assert (
        invoke(
            *run_args(
                text_folder, out, "--seq-len", 16, "--micro-bsz", 2, "--no-shuffle", "--pack-sample-into-one"
            )
        ).exit_code
        == 0
    )
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    segment = result.output.split("── segment 0")[1].split("── segment 1")[0]
    assert "<s>你好</s>⟨-100⟩" in segment and "<s>hello w" in segment


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "0", "--micro-bsz", "1"], "--seq-len must be at least 1"),
        (["--seq-len", "8", "--micro-bsz", "0"], "--micro-bsz must be at least 1"),
        (
            ["--seq-len", "8", "--micro-bsz", "1", "--valid-fraction", "1"],
            "--valid-fraction must be in [0, 1)",
        ),
        (["--seq-len", "8", "--micro-bsz", "1", "--min-length", "100"], "no documents left to pack"),
    ],
)
def test_run_errors_are_one_clean_message(text_folder, tmp_path, args, message):
    result = invoke(*run_args(text_folder, tmp_path / "out", *args))
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_token_manifest_and_non_empty_output(text_folder, tmp_path):
    result = invoke(
        "run", "--input", tmp_path / "nothing", "--output", tmp_path / "out", "--seq-len", 8, "--micro-bsz", 1
    )
    assert result.exit_code != 0 and "nothing/manifest.json does not exist" in result.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    result = invoke(*run_args(text_folder, tmp_path / "busy", "--seq-len", 8, "--micro-bsz", 1))
    assert result.exit_code != 0 and "is not empty; pass --overwrite" in result.output


def test_inspect_errors(text_folder, tmp_path):
    result = invoke("inspect", tmp_path)
    assert result.exit_code != 0 and "manifest.json does not exist" in result.output
    out = tmp_path / "out"
    invoke(*run_args(text_folder, out, "--seq-len", 16, "--micro-bsz", 2))
    result = invoke("inspect", out, "--row", 5)
    assert result.exit_code != 0 and "row 5 out of range: split 'train' has 2 rows" in result.output
    result = invoke("inspect", out, "--split", "valid")
    assert result.exit_code != 0 and "no split 'valid'" in result.output


@pytest.mark.process
def test_module_entry_point(text_folder, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "pack_stage.cli",
        *map(str, run_args(text_folder, out, "--seq-len", 8, "--micro-bsz", 2)),
    ]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "packed 33 tokens into 3 rows" in done.stderr
    assert "train: 3 rows" in done.stdout
