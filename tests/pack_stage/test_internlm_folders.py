"""Folders written by InternLM's tools (tokenizer.py: <type>/*.bin JSON lines + *.bin.meta;
alpaca_tokenizer.py: negative ids for prompt tokens) as pack-stage input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pack_stage.internlm_folder import InternLMDataError, data_type_of
from pack_stage.pack import PackConfig, pack
from pack_stage.reader import PackedReader
from pack_stage.schema import IGNORE_INDEX
from tests.conftest import run_cli
from tests.pack_stage.internlm_writer import alpaca_sample, random_documents, write_bin


def _folder(tmp_path):
    files = {
        "cn/b.bin": random_documents(12, 1),
        "code/c.bin": random_documents(7, 2),
        "en/a.bin": random_documents(20, 0),
        "zhihu/d.bin": random_documents(5, 3),
    }
    for rel, docs in files.items():
        write_bin(tmp_path / "data" / rel, docs)
    return tmp_path / "data", files


def _stream(reader):
    batch = reader.batch(range(len(reader)))
    keep = batch.type_ids.reshape(-1) >= 0
    return (
        batch.input_ids.reshape(-1)[keep],
        batch.labels.reshape(-1)[keep],
        batch.type_ids.reshape(-1)[keep],
    )


def test_internlm_folder_packs_every_document_in_order_with_internlm_type_ids(tmp_path):
    data, files = _folder(tmp_path)
    config = PackConfig(input=data, output=tmp_path / "out", seq_len=16, micro_bsz=2, shuffle=False)
    manifest = pack(config, progress=False)

    assert manifest.types == {"en": 0, "cn": 1, "code": 2, "zhihu": 3}
    for rel, docs in files.items():
        assert manifest.splits["train"].tokens_per_type[rel.split("/")[0]] == sum(map(len, docs))
    tokens, labels, types = _stream(PackedReader(tmp_path / "out"))
    documents = [d for rel in sorted(files) for d in files[rel]]  # the manifest's order: by path
    assert tokens.tolist() == [t for d in documents for t in d]
    expected_labels = [t for d in documents for t in [*d[1:], IGNORE_INDEX]]
    assert labels.tolist() == expected_labels
    expected_types = [
        manifest.types[rel.split("/")[0]] for rel in sorted(files) for d in files[rel] for _ in d
    ]
    assert types.tolist() == expected_types
    assert manifest.tokenizer.kind == "unknown" and manifest.tokenizer.vocab_size == 1 + max(
        max(d) for d in documents
    )


def test_the_same_folder_again_is_nothing_to_do_and_a_changed_file_is_packed_again(tmp_path, caplog):
    data, _ = _folder(tmp_path)
    config = PackConfig(input=data, output=tmp_path / "out", seq_len=16, micro_bsz=2)
    first = pack(config, progress=False)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert pack(config, progress=False) == first
    assert "nothing to do" in caplog.text and "reading the InternLM" not in caplog.text

    write_bin(data / "en" / "a.bin", random_documents(25, 9))
    with pytest.raises(Exception, match="--overwrite"):
        pack(config, progress=False)  # a finished pack of other content is never replaced silently
    again = pack(PackConfig(**{**config.__dict__, "overwrite": True}), progress=False)
    assert again.splits["train"].documents == first.splits["train"].documents + 5


def test_alpaca_rows_read_abs_ids_and_never_target_prompt_tokens(tmp_path):
    samples = [alpaca_sample([40 + i, 41, 42], [50 + i, 51]) for i in range(6)]
    # alpaca_tokenizer.py saves its meta from a list of tuples: int64, not int32.
    write_bin(tmp_path / "sft" / "en" / "dataset.bin", samples, meta_dtype=np.int64)
    pack(PackConfig(input=tmp_path / "sft", output=tmp_path / "out", seq_len=16, micro_bsz=1, shuffle=False))
    tokens, labels, _ = _stream(PackedReader(tmp_path / "out"))
    flat = [t for s in samples for t in s]
    assert tokens.tolist() == [abs(t) for t in flat]
    # Position i is trained to predict token i + 1 only when that token is a (positive) answer token.
    expected = []
    for sample in samples:
        expected += [t if t > 0 else IGNORE_INDEX for t in sample[1:]] + [IGNORE_INDEX]
    assert labels.tolist() == expected
    assert (labels != IGNORE_INDEX).sum() == 6 * 3  # two answer tokens and EOS per sample


def _bad(tmp_path, damage):
    path = write_bin(tmp_path / "bad" / "en" / "x.bin", [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    damage(path)
    return tmp_path / "bad"


def _save_meta(path, rows, dtype=np.int32):
    with open(str(path) + ".meta", "wb") as handle:
        np.save(handle, np.array(rows, dtype=dtype))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: _save_meta(p, [(0, 3), (23, 2), (41, 4)]),
            r"x\.bin:2: the line starts at byte 22, but row 1",
        ),
        (
            lambda p: _save_meta(p, [(0, 3), (22, 3), (41, 4)]),
            r"x\.bin:2: 2 tokens, but row 1 of x\.bin\.meta says 3",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:-6]), r"x\.bin:3: truncated line"),
        (lambda p: _save_meta(p, [(0, 3), (22, 2)]), r"x\.bin:3: the \.bin has more lines than x\.bin\.meta"),
        (
            lambda p: _save_meta(p, [(0, 3), (22, 2), (41, 4), (70, 1)]),
            r"x\.bin:4: x\.bin\.meta lists 4 lines, the \.bin ends after 3",
        ),
        (lambda p: _save_meta(p, [0, 22, 41]), r"x\.bin\.meta: expected an integer array"),
        (lambda p: (p.parent / "x.bin.meta").unlink(), r"x\.bin: no x\.bin\.meta beside it"),
        (
            lambda p: p.write_bytes(p.read_bytes().replace(b'"tokens"', b'"tokenz"', 1)),
            r'x\.bin:1: expected \{"tokens": \[integers\]\}',
        ),
        (lambda p: p.write_bytes(p.read_bytes().replace(b"[8, 9]", b"[8, 9.5]")), r"x\.bin:2: expected"),
    ],
    ids=[
        "offset",
        "count",
        "truncated",
        "more-lines",
        "fewer-lines",
        "shape",
        "missing",
        "no-tokens",
        "float",
    ],
)
def test_a_meta_that_disagrees_with_its_bin_is_an_error_naming_file_and_line(tmp_path, damage, message):
    folder = _bad(tmp_path, damage)
    with pytest.raises(InternLMDataError, match=message) as error:
        pack(PackConfig(input=folder, output=tmp_path / "out", seq_len=8, micro_bsz=1), progress=False)
    assert str(folder / "en" / "x.bin") in str(error.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_type_names_follow_internlm_folder_rule(tmp_path):
    assert data_type_of(tmp_path / "data", "z_en/a.bin") == "en"
    assert data_type_of(tmp_path / "data", "zcode/sub/a.bin") == "code"
    assert data_type_of(tmp_path / "cn", "a.bin") == "cn"  # train_folder=".../cn" itself
    assert data_type_of(tmp_path / "data", "wiki/part/a.bin") == "wiki"
    with pytest.raises(InternLMDataError, match="several data types"):
        data_type_of(tmp_path / "data", "en/cn/a.bin")


@pytest.mark.process
def test_pack_stage_cli_packs_an_internlm_folder_ahead_of_time(tmp_path, hf_tokenizer_json):
    data, files = _folder(tmp_path)
    args = ["pack_stage.cli", "run", "--input", str(data), "--output", str(tmp_path / "out")]
    args += ["--seq-len", "16", "--micro-bsz", "2", "--no-progress"]
    first = run_cli(*args)
    assert "en: 20 documents" in first.stdout and "zhihu: 5 documents" in first.stdout
    second = run_cli(*args)
    assert "nothing to do" in second.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == sum(map(len, files.values()))
    shown = run_cli("pack_stage.cli", "inspect", str(tmp_path / "out"), check=False)
    assert shown.returncode != 0 and "names no tokenizer" in shown.stderr and "Traceback" not in shown.stderr

    # Packed with the tokenizer the .bin files were made with, the pack names it and inspect decodes.
    named = [*args[:5], str(tmp_path / "named"), *args[6:], "--tokenizer", str(hf_tokenizer_json)]
    run_cli(*named)
    shown = run_cli("pack_stage.cli", "inspect", str(tmp_path / "named"))
    assert "tokenizer: hf " + str(hf_tokenizer_json) in shown.stdout
    assert re.search(r"document #\d+: (cn|code|en|zhihu)/\w\.bin:\d+ \(type \w+\)", shown.stdout)
