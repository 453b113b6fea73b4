"""Broker credentials written at provisioning time: the embedded amqtt broker's password file.

amqtt's ``FileAuthPlugin`` reads ``user:<argon2 hash>`` lines (pwdlib); Mosquitto needs its own ``$7$`` format,
made with ``mosquitto_passwd``. Writing credentials is provisioning's job (DESIGN §8); the gateway only reads.
"""

from __future__ import annotations

from pathlib import Path

from blockdeepnet.acl import USERNAME_RE
from blockdeepnet.private_files import write_private_atomic


def write_amqtt_password_file(
    path: Path, users: dict[str, str], *, time_cost: int = 2, memory_cost: int = 19456, parallelism: int = 1
) -> None:
    """Write amqtt's ``FileAuthPlugin`` password file: ``user:<argon2id hash>`` lines, mode 0600.

    Atomic (a private temporary file in the same directory, fsynced, then renamed over ``path``), so a
    broker that reads it concurrently sees the old file or the new one. The argon2 cost defaults are the
    OWASP minimum because amqtt verifies on its event loop (see the module notes); the parameters travel
    inside each hash, so they can be raised later without touching the broker. Mosquitto needs its own
    ``$7$`` format: make that file with ``mosquitto_passwd``.
    """
    from pwdlib.hashers.argon2 import Argon2Hasher  # the gateway extra; imported where the cost is paid

    for name, password in users.items():
        if type(name) is not str or not USERNAME_RE.fullmatch(name):
            raise ValueError(f"MQTT username {name!r:.80} must be 1..128 of [A-Za-z0-9_.@-]")
        if type(password) is not str or not password or "\n" in password or "\r" in password:
            raise ValueError(f"password of {name}: must be a non-empty single-line string")
    hasher = Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism)
    text = "".join(f"{name}:{hasher.hash(password)}\n" for name, password in users.items())

    write_private_atomic(Path(path), text)
