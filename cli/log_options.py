"""The ``--log-level`` and ``--log-format`` options the daemon commands share, and how they report a fatal
error in that format."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from blockdeepnet.logs import FORMATS
from cli.errors import fail

log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log messages shown (stderr).",
)

log_format_option = click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    envvar="BDN_LOG_FORMAT",
    show_envvar=True,
    help=(
        "journal: one line per record, prefixed with its syslog priority <N> for journald, no time stamp; "
        "json: one JSON object per line (ts, level, logger, msg, and round, device, ... when the line "
        "concerns them); text: time, level, logger, message; auto: journal when stderr is connected to "
        "journald ($JOURNAL_STREAM, as under systemd), text otherwise."
    ),
)


def fatal(message: str, log_format: str) -> NoReturn:
    """Exit with status 2 after a set-up error: the usual one ``error:`` line on a terminal (``text``), a
    critical log record for journald or a JSON log reader, which would not recognise a bare line."""
    if log_format == "text":
        fail(message)
    logging.getLogger("bdn").critical("error: %s", message)
    sys.exit(2)
