"""A trainer using a CURVE-protected standalone uploader (as on a storage node) through its config:
uploader = dict(address=..., server_public_key=..., client_secret_key_file=...)."""

from __future__ import annotations

import pytest

from tests.ckpt_uploader.conftest import serve
from tests.conftest import run_cli
from tests.train_kernel.checkpoint.helpers import config_text
from train_kernel.config import config_from_text
from train_kernel.config.errors import ConfigError
from train_kernel.train.trainer import train

pytestmark = pytest.mark.server


@pytest.fixture
def curve_uploader(tmp_path):
    keys = tmp_path / "keys"
    run_cli("ckpt_uploader", "keygen", str(keys))
    spool = tmp_path / "spool"
    allowed = f"local:{tmp_path / 'run' / 'ckpt'}"
    process, address = serve(spool, "--curve-keys", str(keys), "--allow-dst", allowed)
    yield keys, spool, address
    process.terminate()
    process.wait(30)


def _config(tmp_path, address: str, spool, uploader_keys: str) -> str:
    return config_text(
        tmp_path / "run",
        extra=(
            "\nckpt['async_upload'] = True\nckpt['oss_snapshot_freq'] = 0\n"
            f"uploader = dict(address={address!r}, spool={str(spool)!r}{uploader_keys})\n"
        ),
    )


def test_a_trainer_saves_through_a_curve_protected_uploader(tmp_path, curve_uploader):
    keys, spool, address = curve_uploader
    extra = (
        f", server_public_key={str(keys / 'server.key')!r}, "
        f"client_secret_key_file={str(keys / 'client.key_secret')!r}"
    )
    train(config_from_text(_config(tmp_path, address, spool, extra)))
    for step in (2, 4, 6):
        assert (tmp_path / "run" / "ckpt" / str(step) / f"{step}.step").exists()
    # The config copied into the checkpoint names the key file, never a secret key.
    secret = (keys / "client.key_secret").read_text().split("secret-key")[1].split('"')[1]
    assert secret not in (tmp_path / "run" / "ckpt" / "6" / "config.py").read_text()


def test_a_client_key_the_uploader_does_not_authorize_is_a_clear_error(tmp_path, curve_uploader):
    keys, spool, address = curve_uploader
    run_cli("ckpt_uploader", "keygen", str(tmp_path / "stranger"))
    extra = (
        f", server_public_key={str(keys / 'server.key')!r}, "
        f"client_secret_key_file={str(tmp_path / 'stranger' / 'client.key_secret')!r}"
    )
    with pytest.raises(ConfigError, match="uploader.address") as error:
        train(config_from_text(_config(tmp_path, address, spool, extra)))
    assert "authorized/" in str(error.value)


def test_curve_keys_need_an_address_and_a_readable_key(tmp_path):
    with pytest.raises(ConfigError, match="server_public_key.*needs uploader.address"):
        config_from_text(config_text(tmp_path, extra="\nuploader = dict(server_public_key='x' * 40)\n"))
    text = config_text(
        tmp_path / "run",
        extra=(
            "\nckpt['async_upload'] = True\n"
            f"uploader = dict(address='tcp://127.0.0.1:9', spool={str(tmp_path / 'spool')!r}, "
            f"server_public_key={str(tmp_path / 'missing.key')!r})\n"
        ),
    )
    with pytest.raises(ConfigError, match="uploader.server_public_key"):
        train(config_from_text(text))
