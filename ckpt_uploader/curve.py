"""CURVE keys (libzmq's built-in authentication and encryption) for a network-facing uploader.

Layout of a key folder (``ckpt-uploader keygen DIR``):
  server.key, server.key_secret   the uploader's key pair (server.key is what clients need)
  client.key, client.key_secret   a key pair for the trainer(s)
  authorized/*.key                client public keys the uploader accepts; when this folder is
                                  empty or absent, any client that knows server.key is accepted
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class CurveError(RuntimeError):
    pass


def create_keys(folder: Path) -> None:
    folder = Path(folder)
    if (folder / "server.key_secret").exists():
        raise CurveError(f"{folder} already holds server keys; remove them first or pick another folder")
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), "server")
    zmq.auth.create_certificates(str(folder), "client")
    (folder / "authorized").mkdir(exist_ok=True)
    shutil.copy(folder / "client.key", folder / "authorized" / "client.key")
    (folder / "server.key_secret").chmod(0o600)
    (folder / "client.key_secret").chmod(0o600)


def load_public_key(source: str | bytes | Path) -> bytes:
    """A Z85 public key given as the key itself (40 characters) or a .key / .key_secret file."""
    if isinstance(source, bytes) and len(source) == 40:
        return source
    if isinstance(source, str) and len(source) == 40 and not Path(source).exists():
        return source.encode("ascii")
    try:
        public, _ = zmq.auth.load_certificate(str(source))
    except (OSError, ValueError) as error:
        raise CurveError(f"cannot read a CURVE public key from {source}: {error}") from None
    return public


def load_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise CurveError(f"cannot read a CURVE key pair from {path}: {error}") from None
    if secret is None:
        raise CurveError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def secure_server_socket(context: zmq.Context, socket: zmq.Socket, folder: Path) -> ThreadAuthenticator:
    """Makes ``socket`` (before bind) a CURVE server with the keys in ``folder``."""
    folder = Path(folder)
    public, secret = load_key_pair(folder / "server.key_secret")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authorized = folder / "authorized"
    if authorized.is_dir() and any(authorized.glob("*.key")):
        authenticator.configure_curve(domain="*", location=str(authorized))
    else:
        authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return authenticator
