"""Mosquitto's password file, written without the ``mosquitto_passwd`` tool (the gateway adds devices at run time).

Mosquitto 2 stores ``user:$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512 with a 12-byte salt
and 101 iterations (its ``pw_sha512_pbkdf2`` default), the hash being the 64-byte derived key. The tests
check the lines against a real Mosquitto. The file is replaced atomically with mode 0600, so a broker reloading
it (SIGHUP) sees the old file or the new one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from blockdeepnet.acl import USERNAME_RE
from blockdeepnet.private_files import write_private_atomic

ITERATIONS = 101
_SALT_BYTES = 12


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The ``$7$`` hash Mosquitto 2 checks ``password`` against."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def set_user(path: Path, user: str, password: str) -> None:
    """Add ``user`` to the password file at ``path`` (created if absent) or replace its password."""
    if not USERNAME_RE.fullmatch(user):
        raise ValueError(f"MQTT username {user!r:.80} must be 1..128 of [A-Za-z0-9_.@-]")
    if not password or "\n" in password or "\r" in password:
        raise ValueError(f"password of {user}: must be a non-empty single-line string")
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and line.split(":", 1)[0] != user]
    write_private_atomic(path, "".join(f"{line}\n" for line in [*kept, f"{user}:{mosquitto_hash(password)}"]))
