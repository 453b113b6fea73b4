"""Secret files written whole: owner-only from the first byte, replaced atomically (broker password files, ACLs,
enrollment ledgers, device credentials). Standard library only."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_private_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data``: a 0600 temporary file of its own in the same folder (``mkstemp``: two
    writers never share one), written whole, fsynced, renamed over it, and the folder fsynced, so a crash
    leaves the old file or the new one and a reader never sees a half."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
