"""The three tokenizers the stage accepts: SentencePiece ``.model``, Hugging Face ``tokenizer.json``
and a byte-level default that needs no file.

Every tokenizer encodes a *batch* of texts into one flat token array plus per-document lengths,
without BOS/EOS (the stage adds those itself so that the rule is the same for every kind).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

# Special-token spellings tried, in order, when a tokenizer.json does not say which are BOS/EOS.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|endoftext|>", "<|im_end|>")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, with the reason."""


@dataclass(frozen=True)
class TokenizerIdentity:
    """What the manifest records so that every later stage uses the very same tokenizer."""

    kind: str  # "byte" | "sentencepiece" | "hf"
    path: str | None
    sha256: str | None
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TokenizerIdentity:
        return cls(**data)


class Tokenizer(Protocol):
    identity: TokenizerIdentity

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (flat token ids as int64, per-text lengths as int64), no BOS/EOS."""

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_piece(self, token_id: int) -> str:
        """A printable spelling of one token, for `pack-stage inspect`."""


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: 0 is padding, 1 BOS, 2 EOS, 3..258 the bytes."""

    OFFSET = 3

    def __init__(self) -> None:
        self.identity = TokenizerIdentity("byte", None, None, 256 + self.OFFSET, 1, 2, 0)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64)
        flat += self.OFFSET
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def token_piece(self, token_id: int) -> str:
        special = {0: "<pad>", 1: "<s>", 2: "</s>"}
        if token_id in special:
            return special[token_id]
        return repr(bytes([token_id - self.OFFSET]))[2:-1]


class SentencePieceTokenizer:
    def __init__(self, path: Path, sha256: str) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path}: not a SentencePiece model ({error})") from error
        bos = self._sp.bos_id()
        eos = self._sp.eos_id()
        pad = self._sp.pad_id()
        self.identity = TokenizerIdentity(
            "sentencepiece",
            str(path),
            sha256,
            self._sp.get_piece_size(),
            bos if bos >= 0 else None,
            eos if eos >= 0 else None,
            max(pad, 0),
        )

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces = self._sp.encode(list(texts), out_type=int)
        return _flatten(pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HuggingFaceTokenizer:
    def __init__(self, path: Path, sha256: str, bos_token: str | None, eos_token: str | None) -> None:
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({error})") from error
        # encode_batch_fast skips offset tracking; older tokenizers releases lack it.
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        self.identity = TokenizerIdentity(
            "hf",
            str(path),
            sha256,
            self._tok.get_vocab_size(with_added_tokens=True),
            self._special_id(bos_token, _BOS_NAMES),
            self._special_id(eos_token, _EOS_NAMES),
            self._special_id(None, ("<pad>", "[PAD]", "<|pad|>")) or 0,
        )

    def _special_id(self, explicit: str | None, candidates: Sequence[str]) -> int | None:
        if explicit is not None:
            token_id = self._tok.token_to_id(explicit)
            if token_id is None:
                raise TokenizerError(f"token {explicit!r} is not in the tokenizer's vocabulary")
            return token_id
        for name in candidates:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._encode(list(texts), add_special_tokens=False)
        return _flatten([e.ids for e in encodings])

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or f"<{token_id}>"


def _flatten(id_lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=total)
    return flat, lengths


def file_sha256(path: Path, block_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(
    path: str | os.PathLike | None, bos_token: str | None = None, eos_token: str | None = None
) -> Tokenizer:
    """Picks the tokenizer kind from the file: none -> byte-level, ``*.json`` -> Hugging Face,
    anything else -> SentencePiece."""
    if path is None:
        return ByteTokenizer()
    path = Path(path).resolve()
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    sha256 = file_sha256(path)
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path, sha256, bos_token, eos_token)
    return SentencePieceTokenizer(path, sha256)


def tokenizer_from_identity(identity: TokenizerIdentity) -> Tokenizer:
    """Re-opens the tokenizer a manifest names, refusing a file that changed since."""
    if identity.kind == "byte":
        return ByteTokenizer()
    if identity.path is None:
        # Data made elsewhere (InternLM's .bin files) does not name its tokenizer.
        raise TokenizerError(
            f"the data names no tokenizer (kind {identity.kind!r}); to see text, pack it with "
            "`pack-stage run --tokenizer FILE`"
        )
    tokenizer = load_tokenizer(identity.path)
    if tokenizer.identity.sha256 != identity.sha256:
        raise TokenizerError(
            f"tokenizer {identity.path} changed since the shards were made "
            f"(sha256 {tokenizer.identity.sha256} != {identity.sha256})"
        )
    return tokenizer
