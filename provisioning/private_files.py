"""Writing secrets to disk: owner-only from the first byte, never through a world-readable moment."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) with mode 0600, refusing to follow a symlink planted there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact anyway
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path`` (and its parents) as a folder only its owner may enter (0700, also when it existed)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
