"""`pack-stage inspect` decodes rows made with SentencePiece and Hugging Face tokenizers too, through
the real tokenize stage."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, write_jsonl


@pytest.mark.process
@pytest.mark.parametrize("tokenizer_fixture", ["sentencepiece_model", "hf_tokenizer_json"])
def test_inspect_shows_the_original_text(tmp_path, request, tokenizer_fixture):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Packed rows keep documents apart with cu_seqlens.",
    ]
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": t} for t in texts])
    run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path / "raw"),
        "--output",
        str(tmp_path / "tok"),
        "--tokenizer",
        str(tokenizer),
        "--no-progress",
    )
    run_cli(
        "pack_stage.cli",
        "run",
        "--input",
        str(tmp_path / "tok"),
        "--output",
        str(tmp_path / "packed"),
        "--seq-len",
        "64",
        "--micro-bsz",
        "2",
        "--no-shuffle",
        "--no-progress",
    )
    output = run_cli("pack_stage.cli", "inspect", str(tmp_path / "packed"), "--row", "0").stdout
    for text in texts:
        assert f"<s>{text}</s>⟨-100⟩" in output, output
    assert "en/a.jsonl:1" in output and "en/a.jsonl:2" in output
