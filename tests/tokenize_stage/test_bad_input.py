"""Bad input is counted and reported with file:line, never silently dropped; --strict stops at
the first."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.tokenize_stage.helpers import documents, tokenize
from tokenize_stage.runner import StageError
from tokenize_stage.schema import TokenManifest


def _bad_corpus(raw):
    write_jsonl(
        raw / "en" / "a.jsonl",
        [
            {"content": "good one"},
            "{not json",
            {"text": "wrong key"},
            {"content": 42},
            "[1, 2]",
            "",
            {"content": ""},
            {"content": "good two"},
        ],
    )
    with open(raw / "en" / "a.jsonl", "ab") as handle:
        handle.write(b'{"content": "caf\xe9"}\n')  # latin-1 byte: invalid UTF-8
        handle.write(b'{"content": "good three"}\n')
    (raw / "en" / "empty.jsonl").write_bytes(b"")


def test_bad_lines_are_counted_and_listed(tmp_path):
    raw = tmp_path / "raw"
    _bad_corpus(raw)
    report = tokenize(raw, tmp_path / "tok")
    manifest = TokenManifest.load(tmp_path / "tok")
    entry = {e.path: e for e in manifest.files}["en/a.jsonl"]
    assert (entry.documents, entry.rejected, entry.blank_lines, entry.empty_documents) == (4, 5, 1, 1)
    assert [line for _, line, _ in documents(tmp_path / "tok")] == [1, 7, 8, 10]
    rejects = [
        json.loads(line)
        for line in (tmp_path / "tok" / "en" / "a.jsonl.rejects.jsonl").read_text().splitlines()
    ]
    assert [(r["line"], r["reason"].split(":")[0].split(" (")[0]) for r in rejects] == [
        (2, "invalid JSON"),
        (3, "missing text key 'content'"),
        (4, "field 'content' is int, not a string"),
        (5, "a JSON list, not an object"),
        (9, "invalid UTF-8 at byte 16 of the line"),
    ]
    assert report.rejected == 5 and report.reject_samples[0].endswith(
        "a.jsonl:2: invalid JSON: " + rejects[0]["reason"][14:]
    )
    assert report.empty_files == ["en/empty.jsonl"]


def test_strict_stops_at_first_bad_line_with_global_line_number(tmp_path):
    raw = tmp_path / "raw"
    records = [{"content": f"line {i} " + "x" * 50} for i in range(5000)]
    records[4321] = "{broken"
    write_jsonl(raw / "en" / "a.jsonl", records)
    with pytest.raises(StageError, match=r"a\.jsonl:4322: invalid JSON.*--strict"):
        tokenize(raw, tmp_path / "tok", strict=True, chunk_bytes=16 << 10, workers=2)
    assert not (tmp_path / "tok" / "manifest.json").exists()


@pytest.mark.process
def test_unreadable_files_fail_the_run_but_keep_the_rest(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "good.jsonl", [{"content": "fine"}])
    (raw / "en" / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    (raw / "en" / "corrupt.jsonl.gz").write_bytes(b"this is not gzip data")
    result = run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(raw),
        "--output",
        str(tmp_path / "tok"),
        "--no-progress",
        check=False,
    )
    assert result.returncode == 1
    assert "FAILED en/gone.jsonl: FileNotFoundError" in result.stderr
    assert "FAILED en/corrupt.jsonl.gz: BadGzipFile" in result.stderr
    assert "2 input(s) failed" in result.stderr
    assert not (tmp_path / "tok" / "manifest.json").exists(), "an incomplete folder must not look finished"
    assert (tmp_path / "tok" / "en" / "good.jsonl.arrow").exists()
    # The user fixes the inputs; the re-run redoes only them.
    (raw / "en" / "gone.jsonl").unlink()
    (raw / "en" / "corrupt.jsonl.gz").unlink()
    result = run_cli(
        "tokenize_stage.cli", "run", "--input", str(raw), "--output", str(tmp_path / "tok"), "--no-progress"
    )
    assert "tokenized 0 file(s) (1 already done)" in result.stdout
    assert TokenManifest.load(tmp_path / "tok").documents == 1


@pytest.mark.process
def test_cli_errors_name_the_problem(tmp_path):
    result = run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path / "none"),
        "--output",
        str(tmp_path / "o"),
        check=False,
    )
    assert result.returncode != 0 and "does not exist" in result.stderr
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jsonl").write_text("{}\n")
    result = run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path / "flat"),
        "--output",
        str(tmp_path / "o"),
        check=False,
    )
    assert result.returncode != 0 and "no .jsonl/.txt/.parquet files under type folders" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--tokenizer",
        str(tmp_path / "flat" / "x.jsonl"),
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_other_settings_on_the_same_output_are_refused(tmp_path, sentencepiece_model):
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": "x"}])
    tokenize(tmp_path / "raw", tmp_path / "tok")
    with pytest.raises(StageError, match="was made with tokenizer="):
        tokenize(tmp_path / "raw", tmp_path / "tok", tokenizer_path=str(sentencepiece_model))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(StageError, match="not empty"):
        tokenize(tmp_path / "raw", tmp_path / "other")


def test_truncated_compressed_files_fail_by_name_and_whole_ones_read_every_line(tmp_path):
    import gzip

    import zstandard

    raw = tmp_path / "raw"
    lines = b"".join(
        json.dumps({"content": f"document {i} " + "y" * 40}).encode() + b"\n" for i in range(3000)
    )
    (raw / "en").mkdir(parents=True)
    compressor = zstandard.ZstdCompressor()
    two_frames = compressor.compress(lines[:5000]) + compressor.compress(lines[5000:])  # as `cat a.zst b.zst`
    (raw / "en" / "whole.jsonl.zst").write_bytes(two_frames)
    (raw / "en" / "cut.jsonl.zst").write_bytes(two_frames[: len(two_frames) * 2 // 3])
    gzipped = gzip.compress(lines)
    (raw / "en" / "cut.jsonl.gz").write_bytes(gzipped[: len(gzipped) * 2 // 3])
    report = tokenize(raw, tmp_path / "tok")
    assert set(report.failed_files) == {"en/cut.jsonl.zst", "en/cut.jsonl.gz"}, report.failed_files
    assert all(message.startswith("EOFError") for message in report.failed_files.values())
    assert not (tmp_path / "tok" / "manifest.json").exists()
    (raw / "en" / "cut.jsonl.zst").unlink()
    (raw / "en" / "cut.jsonl.gz").unlink()
    tokenize(raw, tmp_path / "tok")
    assert len(documents(tmp_path / "tok")) == 3000


@pytest.mark.parametrize("name", ["big.jsonl", "big.jsonl.gz"])
def test_a_line_over_the_limit_is_rejected_by_line_and_the_rest_kept(tmp_path, name):
    import gzip

    raw = tmp_path / "raw"
    records = [json.dumps({"content": f"doc {i}"}) for i in range(300)]
    records[120] = json.dumps({"content": "g" * (1 << 20)})  # a 1 MiB line; the limit is 64 KiB
    data = ("\n".join(records) + "\n").encode()
    (raw / "en").mkdir(parents=True)
    (raw / "en" / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    # 16 KiB units: dozens of them start inside the giant line, and each must skip it in pieces.
    report = tokenize(raw, tmp_path / "tok", max_line_bytes=64 << 10, chunk_bytes=16 << 10)
    assert report.failed_files == {}
    rejects = [json.loads(line) for line in (tmp_path / "tok" / "en" / f"{name}.rejects.jsonl").open()]
    assert [(r["file"], r["line"]) for r in rejects] == [(f"en/{name}", 121)]
    assert "longer than the limit of 65,536" in rejects[0]["reason"]
    kept = documents(tmp_path / "tok")
    assert [line for _, line, _ in kept] == [i + 1 for i in range(300) if i != 120]
