"""tokenize-stage --sft: chat / instruction jsonl through a chat template, prompt tokens stored
negated (InternLM's convention) so that packing masks them from the loss."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pack_stage.pack import PackConfig, pack
from pack_stage.reader import PackedReader
from pack_stage.schema import IGNORE_INDEX
from tests.conftest import run_cli, write_jsonl
from tests.tokenize_stage.helpers import documents, tokenize
from tokenize_stage.runner import StageError
from tokenize_stage.text_tokenizers import ByteTokenizer, load_tokenizer

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    },
    {"prompt": "2 + 2?", "response": "4"},
    {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
]
DEFAULT_TEXTS = [
    "<|System|>:Be brief.\n<|User|>:Capital of France?\n<|Bot|>:Paris.\n<|User|>:And Italy?\n<|Bot|>:Rome.\n",
    "<|User|>:2 + 2?\n<|Bot|>:4\n",
    "<|User|>:Add the numbers.\n1 2\n<|Bot|>:3\n",
]
TARGETS = [["Paris.\n", "Rome.\n"], ["4\n"], ["3\n"]]


def _runs(tokens: list[int], positive: bool) -> list[list[int]]:
    """Maximal runs of positive (or negative) ids, BOS and EOS excluded."""
    runs, current = [], []
    for t in tokens[1:-1]:
        if (t > 0) == positive:
            current.append(abs(t))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_default_template_masks_everything_but_the_replies(tmp_path):
    write_jsonl(tmp_path / "raw" / "en" / "chat.jsonl", [*CHAT, {"content": "plain text"}, {"messages": []}])
    report = tokenize(tmp_path / "raw", tmp_path / "tok", sft=True)
    assert report.rejected == 2
    assert (
        "chat.jsonl:4: no 'messages', 'prompt'/'response' or 'instruction'/'output' fields"
        in (report.reject_samples[0])
    )
    byte = ByteTokenizer()
    rows = documents(tmp_path / "tok")
    assert [line for _, line, _ in rows] == [1, 2, 3]
    for (_, _, tokens), text, targets in zip(rows, DEFAULT_TEXTS, TARGETS):
        assert tokens[0] == 1 and tokens[-1] == 2  # BOS, then EOS as a target (the model learns to stop)
        assert byte.decode([abs(t) for t in tokens]) == text
        assert [byte.decode(run) for run in _runs(tokens, positive=True)] == targets

    # Packed, only reply tokens and the final EOS are targets; the model reads the absolute ids.
    pack(PackConfig(input=tmp_path / "tok", output=tmp_path / "out", seq_len=256, micro_bsz=1, shuffle=False))
    reader = PackedReader(tmp_path / "out")
    batch = reader.batch(range(len(reader)))
    assert batch.input_ids.min() >= 0
    targets = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    expected = []
    for text_targets in TARGETS:
        for reply in text_targets:
            expected += byte.encode_batch([reply])[0].tolist()
        expected.append(2)
    assert targets == expected


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_tokenizers_own_chat_template_is_used_and_recorded(tmp_path, hf_tokenizer_json):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    shutil.copy(hf_tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    write_jsonl(tmp_path / "raw" / "en" / "chat.jsonl", CHAT[:2])
    tokenize(tmp_path / "raw", tmp_path / "tok", sft=True, tokenizer_path=str(folder / "tokenizer.json"))

    tokenizer = load_tokenizer(folder / "tokenizer.json")
    rows = documents(tmp_path / "tok")
    first = rows[0][2]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT[0]["messages"])
    assert tokenizer.decode([abs(t) for t in first[1:-1]]) == rendered
    replies = [tokenizer.decode(run) for run in _runs(first, positive=True)]
    assert replies == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["token_dtype"] == "int32"
    assert manifest["settings"]["sft"]["chat_template"] == str(folder / "tokenizer_config.json")

    # Another template on the same output folder would mix two renderings: refused.
    with pytest.raises(StageError, match="settings"):
        tokenize(
            tmp_path / "raw",
            tmp_path / "tok",
            sft=True,
            chat_template="default",
            tokenizer_path=str(folder / "tokenizer.json"),
        )


def test_asking_for_the_tokenizers_template_when_it_has_none_is_an_error(tmp_path, hf_tokenizer_json):
    write_jsonl(tmp_path / "raw" / "en" / "chat.jsonl", CHAT[:1])
    with pytest.raises(StageError, match="no tokenizer_config.json with a chat_template"):
        tokenize(
            tmp_path / "raw",
            tmp_path / "tok",
            sft=True,
            chat_template="tokenizer",
            tokenizer_path=str(hf_tokenizer_json),
        )


def test_sft_shards_are_signed_and_plain_ones_stay_unsigned(tmp_path):
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": "hello"}])
    tokenize(tmp_path / "raw", tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["token_dtype"] == "uint16"
    assert np.all(np.asarray(documents(tmp_path / "plain")[0][2]) > 0)


@pytest.mark.process
def test_the_cli_prepares_sft_data_and_refuses_options_it_would_ignore(tmp_path):
    write_jsonl(tmp_path / "raw" / "en" / "chat.jsonl", CHAT)
    args = ["tokenize_stage.cli", "run", "--input", str(tmp_path / "raw"), "--no-progress"]
    run_cli(*args, "--output", str(tmp_path / "tok"), "--sft", "--workers", "1")
    assert [abs(t) for t in documents(tmp_path / "tok")[1][2]] == [
        1,
        *ByteTokenizer().encode_batch([DEFAULT_TEXTS[1]])[0].tolist(),
        2,
    ]
    refused = run_cli(*args, "--output", str(tmp_path / "x"), "--sft", "--text-key", "text", check=False)
    assert refused.returncode != 0 and "drop --text-key" in refused.stderr
    refused = run_cli(*args, "--output", str(tmp_path / "y"), "--chat-template", "default", check=False)
    assert refused.returncode != 0 and "--chat-template applies to --sft data only" in refused.stderr
