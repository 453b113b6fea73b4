"""Every branch of the round-closing rule: a round closes, extends or is skipped, and never waits forever."""

from __future__ import annotations

import pytest

from blockdeepnet.config import RoundsConfig
from gateway.rounds import Decision, decide

CFG = RoundsConfig(quorum=5, min_updates=2, deadline_s=60, max_extensions=1)


def _decide(cfg: RoundsConfig = CFG, **kw: float) -> Decision:
    args = {
        "registered": 10,
        "recorded": 0,
        "in_flight": 0,
        "online_missing": 3,
        "now": 0.0,
        "deadline_at": 60.0,
        "extensions": 0,
    }
    args.update(kw)
    return decide(cfg, **args)[0]  # type: ignore[arg-type]


def test_closes_at_quorum() -> None:
    assert _decide(recorded=5) is Decision.CLOSE
    assert _decide(recorded=4) is Decision.WAIT


def test_quorum_zero_means_every_registered_device() -> None:
    cfg = RoundsConfig(quorum=0, min_updates=1)
    assert _decide(cfg, registered=3, recorded=3) is Decision.CLOSE
    assert _decide(cfg, registered=3, recorded=2, online_missing=1) is Decision.WAIT


def test_never_closes_over_updates_still_going_to_the_chain() -> None:
    assert _decide(recorded=5, in_flight=1) is Decision.WAIT
    assert _decide(recorded=5, in_flight=1, now=1e9) is Decision.WAIT


def test_closes_early_when_every_online_device_submitted() -> None:
    assert _decide(recorded=3, online_missing=0) is Decision.CLOSE
    assert _decide(recorded=1, online_missing=0) is Decision.WAIT  # below min_updates


@pytest.mark.parametrize(
    ("recorded", "extensions", "expected"),
    [(2, 0, Decision.CLOSE), (1, 0, Decision.EXTEND), (1, 1, Decision.SKIP), (0, 1, Decision.SKIP)],
)
def test_at_the_deadline(recorded: int, extensions: int, expected: Decision) -> None:
    assert _decide(recorded=recorded, extensions=extensions, now=60.0) is expected


def test_skip_reason_names_the_counts() -> None:
    decision, why = decide(
        CFG, registered=10, recorded=1, in_flight=0, online_missing=0, now=61, deadline_at=60, extensions=1
    )
    assert decision is Decision.SKIP and "1 of min 2" in why
