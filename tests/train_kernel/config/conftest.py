"""Fixtures for the config tests: config files written on the spot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SEED_CONFIG = ROOT / "configs" / "7B_sft.py"


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config(text, name="cfg.py") -> path of a config file holding the dedented text."""

    def write(text: str, name: str = "cfg.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
