"""Sparkplug B payloads as the gateway writes them, read back with Eclipse Tahu's generated schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sparkplub_b_packets.core import sparkplug_b_pb2 as tahu

from gateway.sparkplug import payload as spb
from gateway.sparkplug.node import BdSeq, device_id
from gateway.sparkplug.payload import BOOLEAN, DOUBLE, INT64, REBIRTH, STRING, MetricSet
from tests.support.sparkplug import metric_value

PACKAGE = Path(spb.__file__).parent


def _metrics() -> MetricSet:
    m = MetricSet([("Round/Number", INT64), ("Round/Phase", STRING), ("Model/Accuracy", DOUBLE)])
    m.set("Round/Number", 3)
    m.set("Round/Phase", "collecting")
    return m


def test_birth_names_every_metric_with_alias_datatype_and_value() -> None:
    decoded = tahu.Payload.FromString(_metrics().birth(0, extra=[("bdSeq", INT64, 7)]))
    assert decoded.seq == 0 and decoded.timestamp > 1_600_000_000_000
    by_name = {m.name: m for m in decoded.metrics}
    assert list(by_name) == ["bdSeq", "Round/Number", "Round/Phase", "Model/Accuracy"]
    assert metric_value(by_name["bdSeq"]) == 7 and not by_name["bdSeq"].HasField("alias")
    assert metric_value(by_name["Round/Number"]) == 3 and by_name["Round/Number"].datatype == tahu.Int64
    assert (
        by_name["Round/Phase"].string_value == "collecting" and by_name["Round/Phase"].datatype == tahu.String
    )
    assert by_name["Model/Accuracy"].is_null and by_name["Model/Accuracy"].datatype == tahu.Double
    assert len({m.alias for m in decoded.metrics if m.HasField("alias")}) == 3


def test_data_carries_only_changes_by_alias() -> None:
    m = _metrics()
    birth = {x.name: x.alias for x in tahu.Payload.FromString(m.birth(0)).metrics}
    assert m.data(1) is None  # nothing changed since the birth
    m.set("Round/Phase", "collecting")  # same value: no change
    m.set("Model/Accuracy", 0.84)
    decoded = tahu.Payload.FromString(m.data(5) or b"")
    assert decoded.seq == 5 and len(decoded.metrics) == 1
    (metric,) = decoded.metrics
    assert not metric.name and metric.alias == birth["Model/Accuracy"] and metric.double_value == 0.84


def test_negative_int64_and_nan() -> None:
    m = MetricSet([("a", INT64), ("b", DOUBLE), ("c", BOOLEAN)])
    m.set("a", -2)
    m.set("b", float("nan"))
    m.set("c", True)
    a, b, c = tahu.Payload.FromString(m.birth(0)).metrics
    assert a.long_value == 2**64 - 2 and b.is_null and c.boolean_value is True


def test_death_has_bdseq_and_no_seq() -> None:
    decoded = tahu.Payload.FromString(spb.death(255))
    assert not decoded.HasField("seq") and [(x.name, x.long_value) for x in decoded.metrics] == [
        ("bdSeq", 255)
    ]


def test_commands_are_read_defensively() -> None:
    cmd = tahu.Payload()
    metric = cmd.metrics.add()
    metric.name, metric.datatype, metric.boolean_value = REBIRTH, tahu.Boolean, True
    assert spb.parse_command(cmd.SerializeToString()) == {REBIRTH: True}
    with pytest.raises(spb.CommandError):
        spb.parse_command(b"\xff\xff\xff\xff")
    with pytest.raises(spb.CommandError, match="more than"):
        spb.parse_command(b"\x00" * (spb.MAX_COMMAND_BYTES + 1))


def test_bdseq_survives_restarts_and_wraps(tmp_path: Path) -> None:
    path = tmp_path / "bdseq"
    assert BdSeq(path).value == 0 and BdSeq(path).value == 1  # each start is a new session
    path.write_text("255\n")
    b = BdSeq(path)
    assert b.value == 0 and b.advance() == 1 and path.read_text() == "1\n"
    assert path.stat().st_mode & 0o077 == 0
    path.write_text("garbage")
    assert BdSeq(path).value == 0


def test_device_ids_are_topic_safe() -> None:
    assert device_id("dev0", "0xAb") == "dev0"
    assert device_id("a/b", "0xAb") == "0xAb" and device_id("x+", "0xAb") == "0xAb"


def test_generated_module_matches_the_proto(tmp_path: Path) -> None:
    """spb_payload_pb2.py is committed (nothing to build at install time); it must be what protoc makes of
    spb_payload.proto today."""
    # grpcio-tools (dev extra, installed by make test) regenerates the module; its absence fails the run below.
    shutil.copy(PACKAGE / "spb_payload.proto", tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(tmp_path / "spb_payload.proto"),
        ],
        check=True,
        timeout=60,
    )
    for name in ("spb_payload_pb2.py", "spb_payload_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text(), f"regenerate {name}"
