"""The agent's persistent state: exact round trips, atomic replacement that survives kill -9, and refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from blockdeepnet.learning import PAPER_CNN_PARAMS
from blockdeepnet.wire import Update
from firmware_agent.errors import AgentSetupError
from firmware_agent.state import STATE_FILE, AgentState, StateError, StateStore


def _state(i: int, pending: bytes | None = None) -> AgentState:
    return AgentState(
        fleet="f",
        contract="0x" + "11" * 20,
        key_fingerprint="0123456789abcdef",
        address="0xd02bd74CCf41603F2628e7CEc5E6eBcdd69280a2",
        weights=np.full(PAPER_CNN_PARAMS, i, dtype=np.float32),
        base_hash=i.to_bytes(32, "big"),
        applied_round=i,
        submitted_round=i + 1,
        pending_update=pending,
    )


def _update(round_no: int) -> bytes:
    return Update(
        round=round_no,
        device="0xd02bd74CCf41603F2628e7CEc5E6eBcdd69280a2",
        samples=10,
        compute_ms=5,
        payload=b"\x01" * 128,
        signature=b"\x02" * 65,
    ).to_cbor()


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s") as store:
        assert store.load() is None
        weights = np.random.default_rng(1).normal(size=PAPER_CNN_PARAMS).astype(np.float32)
        saved = _state(3, _update(4)).evolve(weights=weights)
        store.save(saved)
        loaded = store.load()
    assert loaded is not None
    assert np.array_equal(loaded.weights, weights) and loaded.weights.dtype == np.float32
    assert (loaded.base_hash, loaded.applied_round, loaded.submitted_round) == (saved.base_hash, 3, 4)
    assert loaded.pending_update == saved.pending_update and loaded.pending_round == 4
    assert (loaded.fleet, loaded.contract, loaded.key_fingerprint, loaded.address) == (
        saved.fleet,
        saved.contract,
        saved.key_fingerprint,
        saved.address,
    )
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / STATE_FILE).stat().st_mode & 0o077 == 0


def test_damaged_or_foreign_files_are_refused_not_replaced(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.save(_state(2))
        raw = (tmp_path / STATE_FILE).read_bytes()
        (tmp_path / STATE_FILE).write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
        with pytest.raises(StateError, match="damaged"):
            store.load()
        (tmp_path / STATE_FILE).write_bytes(raw[: len(raw) // 2])
        with pytest.raises(StateError, match="damaged"):
            store.load()
        (tmp_path / STATE_FILE).write_bytes(b"not a state file")
        with pytest.raises(StateError, match="bad magic"):
            store.load()


def test_a_second_agent_cannot_share_the_folder(tmp_path: Path) -> None:
    with StateStore(tmp_path), pytest.raises(AgentSetupError, match="in use by another running agent"):
        StateStore(tmp_path).open()
    StateStore(tmp_path).open()  # released with the first


def test_leftover_temporary_files_are_removed_and_never_read(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.save(_state(1))
    (tmp_path / ".agent-state.crash").write_bytes(b"half a write")
    with StateStore(tmp_path) as store:
        loaded = store.load()
    assert loaded is not None and loaded.applied_round == 1
    assert not list(tmp_path.glob(".agent-state.*"))


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from tests.unit.test_agent_state import _state
    from firmware_agent.state import StateStore

    store = StateStore(Path(sys.argv[1]))
    store.open()
    i = int(sys.argv[3])
    while True:
        i += 1
        store.save(_state(i))
        print(i, flush=True)
    """
)


@pytest.mark.timeout(60)
def test_kill_9_during_saves_leaves_the_old_or_the_new_state(tmp_path: Path) -> None:
    """A real crash, repeatedly, at arbitrary points of the write: the file always loads and is consistent."""
    root = str(Path(__file__).resolve().parents[2])
    last = 0
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), root, str(last)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = int(proc.stdout.readline())  # at least one save completed
        time.sleep(delay)
        proc.kill()
        done = [first, *(int(line) for line in proc.stdout.read().split())]
        proc.wait()
        with StateStore(tmp_path) as store:
            state = store.load()
        assert state is not None
        i = state.applied_round
        assert i >= done[-1], "a save that returned must be durable"
        assert np.all(state.weights == i) and state.base_hash == i.to_bytes(32, "big")
        last = i
