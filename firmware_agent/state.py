"""The agent's durable state: the model it holds, which rounds it has done, and the update still in flight.

Why it must survive a crash or ``kill -9``: the model is the product of every applied round (losing it means
catching up again from retained global blocks, if the broker still has them); ``submitted_round`` keeps a
restarted device from training a round twice (a second, different update would be refused as a duplicate and
waste a round of compute); ``pending_update`` holds the exact bytes already signed, so a restart republishes
*the same* update, which the gateway answers with the original receipt.

One file, ``agent-state.bin`` in the state folder: a magic, a SHA-256 of the body, and a CBOR body. A write
goes to a fresh temporary file in the same folder, is fsynced, renamed over the old file (atomic on POSIX), and
the folder is fsynced, so after a crash the file is either the old state or the new one, complete; a damaged
file is detected by the checksum and refused with a clear error rather than silently replaced by a fresh
model. A lock file (flock) keeps two agents from sharing one state folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import cbor2
import numpy as np
import numpy.typing as npt

from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.wire import Update, WireError
from firmware_agent.errors import AgentSetupError

STATE_FILE = "agent-state.bin"
LOCK_FILE = "agent.lock"
_MAGIC = b"BDNAGST1"
_DIGEST = 32
_VERSION = 1
_TMP_PREFIX = ".agent-state."


class StateError(AgentSetupError):
    """The state file exists but cannot be used (damaged, another fleet's, another version)."""


@dataclass(frozen=True, eq=False)
class AgentState:
    """A snapshot of what the device must not forget. Immutable: every change is a new snapshot, saved whole.

    ``base_hash`` names ``weights`` the way the chain does (the initial model hash, then the aggregate hash of
    the last applied round). ``applied_round`` / ``submitted_round`` / ``shared_round`` are 0 before the first.
    ``fleet``, ``contract`` and ``key_fingerprint`` tie the folder to one fleet.
    """

    fleet: str
    contract: str
    key_fingerprint: str
    address: str
    weights: npt.NDArray[np.float32]
    base_hash: bytes
    applied_round: int = 0
    submitted_round: int = 0
    shared_round: int = 0
    pending_update: bytes | None = None

    @property
    def pending_round(self) -> int | None:
        """The round of the update awaiting its receipt, if any."""
        if self.pending_update is None:
            return None
        return Update.from_cbor(self.pending_update).round

    def evolve(self, **changes: Any) -> AgentState:
        """A copy with ``changes`` applied (the weights array is shared unless replaced)."""
        return replace(self, **changes)

    def to_bytes(self) -> bytes:
        weights = np.ascontiguousarray(self.weights, dtype="<f4")
        body = cbor2.dumps(
            {
                "v": _VERSION,
                "fleet": self.fleet,
                "contract": self.contract,
                "key": self.key_fingerprint,
                "address": self.address,
                "weights": weights.tobytes(),
                "base": self.base_hash,
                "applied": self.applied_round,
                "submitted": self.submitted_round,
                "shared": self.shared_round,
                "pending": self.pending_update,
            },
            canonical=True,
        )
        return _MAGIC + hashlib.sha256(body).digest() + body

    @classmethod
    def from_bytes(cls, raw: bytes, where: Path) -> Self:
        header = len(_MAGIC) + _DIGEST
        if len(raw) < header or raw[: len(_MAGIC)] != _MAGIC:
            raise StateError(f"{where} is not an agent state file (bad magic)")
        digest, body = raw[len(_MAGIC) : header], raw[header:]
        if hashlib.sha256(body).digest() != digest:
            raise StateError(f"{where} is damaged (checksum mismatch); restore it or delete it to start over")
        try:
            d = cbor2.loads(body)
            if d["v"] != _VERSION:
                raise StateError(f"{where} has state version {d['v']}, this agent reads {_VERSION}")
            weights = np.frombuffer(d["weights"], dtype="<f4").astype(np.float32)
            if weights.shape != (PAPER_CNN_PARAMS,):
                raise StateError(f"{where} holds {weights.size} weights, the model has {PAPER_CNN_PARAMS}")
            pending = d["pending"]
            if pending is not None:
                Update.from_cbor(pending)
            return cls(
                fleet=str(d["fleet"]),
                contract=str(d["contract"]),
                key_fingerprint=str(d["key"]),
                address=str(d["address"]),
                weights=weights,
                base_hash=bytes(d["base"]),
                applied_round=int(d["applied"]),
                submitted_round=int(d["submitted"]),
                shared_round=int(d["shared"]),
                pending_update=None if pending is None else bytes(pending),
            )
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, WireError, cbor2.CBORDecodeError) as exc:
            raise StateError(f"{where} has a valid checksum but unreadable content: {exc}") from None


class StateStore:
    """Loads and atomically saves :class:`AgentState` in one folder, which it locks for its lifetime."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._lock_fd: int | None = None

    def open(self) -> None:
        """Create the folder (0700) if needed, take the lock, and remove temporary files a crash left."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AgentSetupError(f"cannot use state folder {self.directory}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentSetupError(
                f"state folder {self.directory} is in use by another running agent; give each agent its own"
            ) from None
        self._lock_fd = fd
        for leftover in self.directory.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def load(self) -> AgentState | None:
        """The saved state, or None when the folder has none yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from None
        return AgentState.from_bytes(raw, self.path)

    def save(self, state: AgentState) -> None:
        """Replace the saved state atomically and durably (temp file, fsync, rename, fsync of the folder)."""
        data = state.to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
