"""SentencePiece and Hugging Face tokenizers give the library's own ids, and the manifest
records who made the shards."""

from __future__ import annotations

import pytest

from tests.conftest import SAMPLE_TEXTS, write_jsonl
from tests.tokenize_stage.helpers import documents, tokenize
from tokenize_stage.runner import StageError
from tokenize_stage.schema import TokenManifest, tokenizer_from_identity
from tokenize_stage.text_tokenizers import TokenizerError, file_sha256, load_tokenizer


def test_sentencepiece_matches_library(tmp_path, sentencepiece_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    texts = SAMPLE_TEXTS[:5]
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": t} for t in texts])
    tokenize(tmp_path / "raw", tmp_path / "tok", tokenizer_path=str(sentencepiece_model))
    got = [tokens for _, _, tokens in documents(tmp_path / "tok")]
    assert got == [[1, *processor.encode(t), 2] for t in texts]
    identity = TokenManifest.load(tmp_path / "tok").tokenizer
    assert (identity.kind, identity.vocab_size, identity.bos_id, identity.eos_id) == (
        "sentencepiece",
        120,
        1,
        2,
    )
    assert identity.sha256 == file_sha256(sentencepiece_model)
    assert tokenizer_from_identity(identity).decode(got[0][1:-1]) == texts[0]


def test_hf_tokenizer_matches_library(tmp_path, hf_tokenizer_json):
    from tokenizers import Tokenizer

    library = Tokenizer.from_file(str(hf_tokenizer_json))
    texts = SAMPLE_TEXTS[:5]
    write_jsonl(tmp_path / "raw" / "code" / "a.jsonl", [{"content": t} for t in texts])
    tokenize(tmp_path / "raw", tmp_path / "tok", tokenizer_path=str(hf_tokenizer_json), workers=2)
    got = [tokens for _, _, tokens in documents(tmp_path / "tok")]
    bos, eos = library.token_to_id("<s>"), library.token_to_id("</s>")
    assert got == [[bos, *library.encode(t, add_special_tokens=False).ids, eos] for t in texts]
    identity = TokenManifest.load(tmp_path / "tok").tokenizer
    assert identity.kind == "hf" and identity.vocab_size == library.get_vocab_size()


def test_changed_tokenizer_file_is_refused(tmp_path, sentencepiece_model):
    identity = load_tokenizer(sentencepiece_model).identity
    copy = tmp_path / "tok.model"
    copy.write_bytes(sentencepiece_model.read_bytes())
    moved = type(identity)(**{**identity.to_json(), "path": str(copy), "sha256": "0" * 64})
    with pytest.raises(TokenizerError, match="changed since"):
        tokenizer_from_identity(moved)


def test_tokenizer_without_bos_needs_a_name(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(
        ["plain text only"],
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[END]"], show_progress=False),
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    write_jsonl(tmp_path / "raw" / "en" / "a.jsonl", [{"content": "plain"}])
    with pytest.raises(StageError, match="no BOS token.*--bos-token"):
        tokenize(tmp_path / "raw", tmp_path / "tok", tokenizer_path=str(path))
    tokenize(tmp_path / "raw", tmp_path / "tok", tokenizer_path=str(path), add_bos=False, eos_token="[END]")
    assert documents(tmp_path / "tok")[0][2][-1] == tokenizer.token_to_id("[END]")


def test_not_a_tokenizer_file(tmp_path):
    bogus = tmp_path / "tok.model"
    bogus.write_text("not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(bogus)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
