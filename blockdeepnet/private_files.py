"""Secret files written whole: owner-only from the first byte, replaced atomically (broker password files, ACLs,
enrollment ledgers, device credentials). Standard library only."""

from __future__ import annotations

import os
from pathlib import Path


def write_private_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` with ``text``: a 0600 temporary file in the same folder, fsynced, renamed over it, and
    the folder fsynced, so a crash leaves the old file or the new one and a reader never sees a half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode() if isinstance(text, str) else text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
