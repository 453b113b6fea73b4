"""Log formats (blockdeepnet/logs.py): JSON lines a log reader can parse, journald lines with the right priority
and exactly one entry per record, and the auto choice between them made from a real file descriptor."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from blockdeepnet.logs import (
    JournalFormatter,
    JsonFormatter,
    TextFormatter,
    fields,
    is_journal_stream,
    journal_priority,
    resolve_format,
    setup_logging,
)
from cli.main import cli
from firmware_agent.agent import _DeviceLog

DEVICE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


def _record(
    msg: str = "round %d open",
    args: tuple[Any, ...] = (3,),
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc: bool = False,
) -> logging.LogRecord:
    """A record as a real logger call makes it (extra fields become attributes, exc_info is captured)."""
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    logger = logging.Logger("bdn.test.logs")  # unregistered: no parent, so only Keep sees the record
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(1)
    try:
        if exc:
            try:
                raise ValueError("bad value\nsecond line")
            except ValueError:
                logger.log(level, msg, *args, extra=extra, exc_info=True)
        else:
            logger.log(level, msg, *args, extra=extra)
    finally:
        logger.removeHandler(handler)
    (record,) = captured
    return record


def _strict_json(line: str) -> dict[str, Any]:
    """json.loads that refuses NaN/Infinity, which Python writes by default but is not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    data: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return data


# ------------------------------------------------------------------------------------------------- JSON


def test_json_line_carries_time_level_logger_message_and_fields() -> None:
    line = JsonFormatter().format(_record(extra=fields(round=3, device=DEVICE, reason="bad_signature")))
    assert "\n" not in line
    entry = _strict_json(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"]), entry["ts"]
    assert entry["level"] == "info"
    assert entry["logger"] == "bdn.test.logs"
    assert entry["msg"] == "round 3 open"
    assert entry["round"] == 3 and entry["device"] == DEVICE and entry["reason"] == "bad_signature"
    assert "exc" not in entry


def test_json_leaves_out_fields_the_record_lacks_and_extras_not_in_the_schema() -> None:
    entry = _strict_json(JsonFormatter().format(_record(extra={"device": DEVICE, "password": "hunter2"})))
    assert entry["device"] == DEVICE
    assert "round" not in entry and "password" not in entry
    assert set(entry) == {"ts", "level", "logger", "msg", "device"}


def test_json_captures_the_traceback_in_one_field() -> None:
    line = JsonFormatter().format(_record(level=logging.ERROR, extra=fields(round=2), exc=True))
    assert "\n" not in line
    entry = _strict_json(line)
    assert entry["level"] == "error" and entry["round"] == 2
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad value\nsecond line" in entry["exc"]


class _NoRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr fails")


def test_json_survives_values_json_cannot_hold() -> None:
    odd = {
        "round": float("nan"),
        "device": b"\x01\x02" * 500,
        "fleet": _NoRepr(),
        "holder": {1, 2},
        "reason": {"nested": [1, b"\xff", float("inf")]},
    }
    entry = _strict_json(JsonFormatter().format(_record(extra=odd)))
    assert entry["round"] == "nan"
    assert entry["device"].startswith("0x0102") and len(entry["device"]) < 300
    assert entry["fleet"] == "<unrepresentable _NoRepr>"
    assert entry["holder"] in ("{1, 2}", "{2, 1}")
    assert entry["reason"] == {"nested": [1, "0xff", "inf"]}


def test_a_call_whose_arguments_do_not_fit_its_format_is_still_one_line() -> None:
    record = _record(msg="round %d open", args=("three",))
    entry = _strict_json(JsonFormatter().format(record))
    assert "round %d open" in entry["msg"] and "three" in entry["msg"]
    assert "\n" not in JournalFormatter().format(record)
    assert "three" in TextFormatter().format(record)


def test_fields_keeps_only_what_was_given() -> None:
    assert fields(round=0, device=None, holder=2) == {"round": 0, "holder": 2}
    assert fields() == {}


# ---------------------------------------------------------------------------------------------- journal


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
        (logging.INFO + 5, 6),
        (logging.DEBUG - 5, 7),
    ],
)
def test_journal_priority_prefix(level: int, priority: int) -> None:
    assert journal_priority(level) == priority
    line = JournalFormatter().format(_record(level=level))
    assert line.startswith(f"<{priority}>bdn.test.logs: round 3 open")


def test_journal_line_has_no_time_stamp_and_appends_what_the_message_does_not_say() -> None:
    fmt = JournalFormatter()
    assert fmt.format(_record(extra=fields(round=3))) == "<6>bdn.test.logs: round 3 open"
    assert (
        fmt.format(_record(extra=fields(round=3, device=DEVICE)))
        == f"<6>bdn.test.logs: round 3 open [device={DEVICE}]"
    )
    assert (
        fmt.format(_record(msg="chain retry", args=(), extra=fields(round=31, device=DEVICE)))
        == f"<6>bdn.test.logs: chain retry [round=31 device={DEVICE}]"
    )
    # "round 3" is not "round 31": the field is appended
    assert fmt.format(_record(args=(31,), extra=fields(round=3))).endswith("round 31 open [round=3]")


def test_journal_keeps_a_traceback_and_hostile_text_in_one_entry() -> None:
    """journald splits its stream at newlines: an escaped newline cannot forge a second (priority 0) entry."""
    record = _record(
        msg="rejected update from %s: %s",
        args=(DEVICE, "detail\n<0>forged emergency\r\x1b[31m"),
        level=logging.ERROR,
        exc=True,
    )
    line = JournalFormatter().format(record)
    assert line.count("\n") == 0 and "\r" not in line and "\x1b" not in line
    assert line.startswith("<3>bdn.test.logs: rejected update from ")
    assert "detail\\n<0>forged emergency\\r\\x1b[31m" in line
    assert " | Traceback (most recent call last):\\n" in line
    assert line.endswith("ValueError: bad value\\nsecond line")


# ------------------------------------------------------------------------------------------------- text


def test_text_line_has_time_level_logger_suffix_and_a_multi_line_traceback() -> None:
    text = TextFormatter().format(
        _record(msg="chain retry %s", args=("a\nb",), level=logging.WARNING, extra=fields(round=4), exc=True)
    )
    first, *rest = text.split("\n")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING bdn.test.logs: chain retry a\\nb \[round=4\]", first
    ), first
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-2:] == ["ValueError: bad value", "second line"]


def test_agent_log_adapter_carries_its_device_and_the_calls_fields() -> None:
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    logger = logging.Logger("bdn.test.adapter")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    adapter = _DeviceLog(logger, {"device": DEVICE})
    adapter.info("round %d: training on %d samples", 5, 100, extra=fields(round=5))
    adapter.info("stopping")
    entries = [_strict_json(JsonFormatter().format(r)) for r in captured]
    assert entries[0]["msg"] == f"device {DEVICE}: round 5: training on 100 samples"
    assert entries[0]["round"] == 5 and entries[0]["device"] == DEVICE
    assert entries[1]["device"] == DEVICE and "round" not in entries[1]
    # the message already names the device and round: text lines read as they did before
    assert TextFormatter().format(captured[0]).endswith("training on 100 samples")


# ------------------------------------------------------------------------------------- auto, set-up


@pytest.fixture
def journal_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    return monkeypatch


def _identity(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_auto_is_journal_only_when_journal_stream_names_this_very_stream(
    tmp_path: Path, journal_env: pytest.MonkeyPatch
) -> None:
    ours, other = tmp_path / "stderr", tmp_path / "other"
    other.touch()
    with ours.open("w") as stream:
        assert not is_journal_stream(stream) and resolve_format("auto", stream) == "text"
        journal_env.setenv("JOURNAL_STREAM", _identity(ours))
        assert is_journal_stream(stream) and resolve_format("auto", stream) == "journal"
        assert resolve_format("json", stream) == "json"  # an explicit choice wins
        journal_env.setenv("JOURNAL_STREAM", _identity(other))  # inherited from a parent whose stderr it was
        assert not is_journal_stream(stream) and resolve_format("auto", stream) == "text"
        for malformed in ("", "12", "a:b", ":"):
            journal_env.setenv("JOURNAL_STREAM", malformed)
            assert not is_journal_stream(stream)
    journal_env.setenv("JOURNAL_STREAM", _identity(ours))
    assert not is_journal_stream(io.StringIO())  # no descriptor at all


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = (sys.excepthook, threading.excepthook)
    noisy = {name: logging.getLogger(name).level for name in ("amqtt", "web3", "asyncio")}
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hooks
        logging.captureWarnings(False)
        for name, lvl in noisy.items():
            logging.getLogger(name).setLevel(lvl)


def test_setup_logging_writes_the_chosen_format_and_quiets_chatty_libraries(
    tmp_path: Path, journal_env: pytest.MonkeyPatch, restore_logging: None
) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        journal_env.setenv("JOURNAL_STREAM", _identity(out))
        assert setup_logging("info", "auto", stream) == "journal"
        logging.getLogger("bdn.gateway").info("round %d open", 1, extra=fields(round=1))
        logging.getLogger("bdn.gateway").debug("not shown at info")
        logging.getLogger("amqtt.broker").info("a client connected")  # quieted
        logging.getLogger("amqtt.broker").warning("a client misbehaved")
        assert setup_logging("debug", "json", stream) == "json"  # a second set-up replaces the first
        logging.getLogger("bdn.gateway").debug("now shown", extra=fields(device=DEVICE))
    lines = out.read_text().splitlines()
    assert lines[:2] == ["<6>bdn.gateway: round 1 open", "<4>amqtt.broker: a client misbehaved"]
    assert len(lines) == 3, lines
    assert _strict_json(lines[2])["device"] == DEVICE


def test_setup_logging_sends_uncaught_thread_exceptions_through_the_format(
    tmp_path: Path, journal_env: pytest.MonkeyPatch, restore_logging: None
) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as stream:
        setup_logging("info", "json", stream)

        def crash() -> None:
            raise RuntimeError("worker died")

        worker = threading.Thread(target=crash, name="bdn-worker")
        worker.start()
        worker.join()
    (line,) = out.read_text().splitlines()
    entry = _strict_json(line)
    assert entry["level"] == "critical" and "bdn-worker" in entry["msg"]
    assert "RuntimeError: worker died" in entry["exc"]


def test_setup_logging_refuses_unknown_names(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="use one of auto, journal, text, json"):
        setup_logging("info", "xml")
    with pytest.raises(ValueError, match="use one of debug, info"):
        setup_logging("loud", "text")


# -------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("role", ["gateway", "agent"])
def test_run_help_explains_every_format(role: str) -> None:
    result = CliRunner().invoke(cli, [role, "run", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--log-format [auto|journal|text|json]" in text
    for explained in ("journal:", "json:", "text:", "auto:", "JOURNAL_STREAM", "BDN_LOG_FORMAT"):
        assert explained in text, explained


def test_bad_log_format_from_the_environment_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["gateway", "run", "--config", str(tmp_path / "gateway.toml")], env={"BDN_LOG_FORMAT": "xml"}
    )
    assert result.exit_code == 2
    assert "xml" in result.output and "auto" in result.output
