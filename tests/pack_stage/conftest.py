"""Fixtures: token folders (tokenize_stage/v1, byte tokenizer) built with pyarrow + json."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pack_stage.pack_fixtures import Doc, TokenFolder, mixed_corpus, write_token_folder


@pytest.fixture
def make_token_folder(tmp_path: Path):
    counter = iter(range(1000))

    def make(files: dict[str, list[Doc]] | None = None, **kwargs) -> TokenFolder:
        return write_token_folder(tmp_path / f"tokens{next(counter)}", files or mixed_corpus(), **kwargs)

    return make


@pytest.fixture
def token_folder(make_token_folder) -> TokenFolder:
    return make_token_folder()
