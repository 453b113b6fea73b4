"""Log output for the daemons: journald lines by default, JSON lines on request, plain text on a terminal.

Under systemd, stderr is a stream into journald, which adds its own time stamp and host, and reads a leading
``<N>`` (sd-daemon(3)) as the line's syslog priority, so ``journalctl -p warning`` finds warnings. journald
cuts that stream at every newline into separate entries, so a multi-line traceback, or a hostile device's
detail text with a newline in it, would become several entries at the default priority (or a forged entry):
the journal and text formats escape control characters in what they print.

Log aggregators want one JSON object per line instead; ``json`` gives that, with the round and device a line
concerns as fields of their own (``extra=fields(round=r, device=addr)`` at the call site), so "everything
device X did in round 7" is a query, not a grep.

Standard library only: the core must not depend on a logging framework.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("auto", "journal", "text", "json")

# Extra record attributes a log line may carry as fields: the JSON formatter emits exactly these (a stable
# schema, and nothing a third-party library happens to attach). Set them through ``fields()``.
FIELDS = ("round", "device", "fleet", "holder", "reason", "tx")
# The ones the journal and text formats append as `` [round=3 device=0x...]`` (the rest are in the message).
_SUFFIX_FIELDS = ("round", "device")

# Libraries that log every connection, state change or HTTP request at info level.
_NOISY = ("amqtt", "transitions", "web3", "urllib3", "aiohttp.access", "asyncio")

_HANDLER_NAME = "bdn"  # ours, among whatever handlers a host process (e.g. pytest) has
_REPR_LIMIT = 200  # an extra field is context, not a payload dump


def fields(
    *,
    round: int | None = None,
    device: str | None = None,
    fleet: str | None = None,
    holder: int | None = None,
    reason: str | None = None,
    tx: str | None = None,
) -> dict[str, object]:
    """The ``extra=`` mapping for a log call: only the fields given (None means "not about one")."""
    given = {"round": round, "device": device, "fleet": fleet, "holder": holder, "reason": reason, "tx": tx}
    return {key: value for key, value in given.items() if value is not None}


# One-line escaping: every C0 control character and DEL, so a record is exactly one journal entry.
_ONE_LINE = {code: f"\\x{code:02x}" for code in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}
# Multi-line text for a terminal: keep newlines and tabs, escape the rest (e.g. ANSI escapes in hostile input).
_MULTI_LINE = {code: text for code, text in _ONE_LINE.items() if code not in (9, 10)}


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, which raises on a call whose arguments do not fit its format string: such a
    line is still printed (as the raw format and arguments) rather than dropped with a traceback."""
    try:
        return record.getMessage().rstrip("\r\n")  # e.g. warnings end in a newline
    except Exception:
        return f"{_safe_repr(record.msg)} % {_safe_repr(record.args)}"


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 1] + "…"


def _jsonable(value: object, depth: int = 0) -> object:
    """A JSON-safe version of an extra field: numbers, strings and small containers as they are, bytes as hex,
    anything else (and NaN, which is not JSON) as its repr. Never raises."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes | bytearray):
        text = "0x" + bytes(value[: _REPR_LIMIT // 2]).hex()
        return text if len(value) <= _REPR_LIMIT // 2 else text + "…"
    if hasattr(type(value), "__index__"):  # numpy and gmpy2 integers
        try:
            return int(value)  # type: ignore[call-overload]
        except Exception:
            return _safe_repr(value)
    if depth < 3 and isinstance(value, list | tuple):
        return [_jsonable(item, depth + 1) for item in value[:_REPR_LIMIT]]
    if depth < 3 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:_REPR_LIMIT]}
    return _safe_repr(value)


def _suffix(record: logging.LogRecord, message: str) -> str:
    """`` [round=3 device=0x...]`` for the fields the message does not already state, so lines whose text
    names the round and device read exactly as before."""
    parts = []
    for key in _SUFFIX_FIELDS:
        value = record.__dict__.get(key)
        if value is None:
            continue
        text = str(value)
        stated = re.search(rf"\bround {re.escape(text)}\b", message) if key == "round" else text in message
        if not stated:
            parts.append(f"{key}={text}")
    return f" [{' '.join(parts)}]" if parts else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC, ms), ``level``, ``logger``, ``msg``, then the
    ``FIELDS`` the record carries, then ``exc`` (the traceback text) and ``stack`` when present. ASCII only, so
    the line survives any stderr encoding."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = _jsonable(value)
        exc = _exc_text(self, record)
        if exc:
            entry["exc"] = exc
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=_safe_repr)


def journal_priority(levelno: int) -> int:
    """The syslog priority journald should store for a Python level (notice, 5, has no Python level)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<6>bdn.gateway: round 3 open ... [device=0x...]``: the sd-daemon priority prefix, no time stamp
    (journald adds it), the traceback on the same line after `` | `` with its newlines escaped as ``\\n``."""

    def format(self, record: logging.LogRecord) -> str:
        message = _message(record)
        line = f"<{journal_priority(record.levelno)}>{record.name}: {message}{_suffix(record, message)}"
        return _with_trace(self, record, line, " | ").translate(_ONE_LINE)


def _exc_text(fmt: logging.Formatter, record: logging.LogRecord) -> str | None:
    """The record's formatted traceback, cached on the record as logging.Formatter does."""
    if record.exc_info and not record.exc_text:
        record.exc_text = fmt.formatException(record.exc_info)
    return record.exc_text or None


def _with_trace(fmt: logging.Formatter, record: logging.LogRecord, line: str, sep: str) -> str:
    """``line`` followed by the record's traceback and stack, each after ``sep``."""
    exc = _exc_text(fmt, record)
    if exc:
        line += sep + exc
    if record.stack_info:
        line += sep + fmt.formatStack(record.stack_info)
    return line


class TextFormatter(logging.Formatter):
    """``2025-01-31 12:00:00,123 INFO bdn.gateway: message [round=3]`` for a terminal or a plain log file;
    a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = _message(record)
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: "
        line += message.translate(_ONE_LINE) + _suffix(record, message)
        return _with_trace(self, record, line, "\n").translate(_MULTI_LINE)


def is_journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is connected to journald: systemd sets ``$JOURNAL_STREAM`` to ``<dev>:<inode>`` of
    the stream it gives a service, and a match (not the variable's mere presence, which child processes
    inherit) is the documented test (systemd.exec(5))."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (AttributeError, OSError, ValueError):  # no real descriptor (e.g. captured), or a malformed value
        return False


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` becomes ``journal`` on a journald stream and ``text`` elsewhere; other choices stay."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "journal" if is_journal_stream(stream) else "text"
    return fmt


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for a resolved format name (``journal``, ``text`` or ``json``)."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}: use journal, text or json")


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Send every log record (and Python warnings, and uncaught exceptions) to ``stream`` (stderr) in one
    format, at ``level`` and above; quiet the chatty libraries. Returns the format chosen (``auto`` resolved).

    Uncaught exceptions go through logging too, so a crash is a critical-priority journal entry (or a JSON
    line) rather than bare traceback lines in the middle of the stream.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, out)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter(chosen))
    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:  # set up twice: replace
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    return chosen


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("bdn").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("bdn").critical(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )
