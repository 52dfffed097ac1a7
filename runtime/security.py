"""ZeroMQ CURVE for tcp:// endpoints: keys, server and client socket setup.

ipc:// endpoints are protected by the runtime directory (0700, sockets 0600).
tcp:// endpoints are encrypted and authenticated with CURVE: the supervisor and
its workers share one server certificate; a client must know the server's
public key and present a key pair whose public key is in the authorized
directory. ``llamafleet keys DIR`` writes both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from llamafleet.runtime.errors import BadRequest

log = logging.getLogger("llamafleet.security")


def generate_keys(directory: str | os.PathLike[str], client_name: str = "client") -> dict[str, str]:
    """Write a server and a client certificate pair into ``directory``.

    Returns the paths: server_secret (for ``curve_server_key``), server_public
    (for clients), client_secret (for clients), authorized (the directory for
    ``curve_authorized_clients``, holding the client's public key)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    auth_dir = d / "authorized"
    auth_dir.mkdir(exist_ok=True, mode=0o700)
    for name in ("server", client_name):
        for suffix in (".key", ".key_secret"):
            (d / f"{name}{suffix}").unlink(missing_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(str(d), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(d), client_name)
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    authorized = auth_dir / f"{client_name}.key"
    authorized.write_bytes(Path(client_public).read_bytes())
    return {"server_secret": server_secret, "server_public": server_public,
            "client_secret": client_secret, "client_public": client_public,
            "authorized": str(auth_dir)}


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read CURVE certificate {path}: {exc}") from None
    if secret is None:
        raise BadRequest(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A server public key given as a certificate path or as 40 Z85 characters."""
    if isinstance(value, bytes) and len(value) == 40:
        return value
    if isinstance(value, str) and len(value) == 40 and not os.path.exists(value):
        return value.encode()
    try:
        public, _ = zmq.auth.load_certificate(str(value))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"cannot read CURVE public key {value!r}: {exc}") from None
    return public


def start_authenticator(ctx: zmq.Context[Any], authorized_dir: str) -> ThreadAuthenticator:
    """Run ZAP in this process: only clients whose public key is in the directory pass."""
    if not os.path.isdir(authorized_dir):
        raise BadRequest(f"curve_authorized_clients {authorized_dir} is not a directory")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("llamafleet.zap"))
    auth.start()
    auth.configure_curve(domain="*", location=authorized_dir)
    return auth


def make_server(sock: zmq.Socket[Any], keypair: tuple[bytes, bytes]) -> None:
    """Turn a socket about to bind on tcp:// into a CURVE server."""
    sock.curve_publickey, sock.curve_secretkey = keypair
    sock.curve_server = True


def make_client(sock: zmq.Socket[Any], server_public: bytes, keypair: tuple[bytes, bytes]) -> None:
    """Turn a socket about to connect to tcp:// into a CURVE client."""
    sock.curve_serverkey = server_public
    sock.curve_publickey, sock.curve_secretkey = keypair
