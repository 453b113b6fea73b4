"""How every `bdn` command reports bad input or config: one line, no traceback, exit code 2."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console


def fail(message: str) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(2)
