"""`bdn bench chain` on small numbers against eth-tester and a real anvil: every key present, gas within budget
and commit gas independent of the update count (gas is deterministic; no timing is asserted)."""

from __future__ import annotations

import pytest

from bench.chain import run

GAS_KEYS = {"deploy", "register", "submit_first", "submit", "commit_10", "commit_100"}
TX_KEYS = {"sequential_tx_s", "pipelined_tx_s", "pipelined_speedup"}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_chain_small() -> None:
    result = run(updates_small=2, updates_large=5, tx_count=6)
    assert result["tx_count"] == 6
    for gas in (result["gas"], result["gas_anvil"]):
        assert GAS_KEYS <= set(gas)
        assert all(isinstance(gas[k], int) and gas[k] > 0 for k in GAS_KEYS), gas
        assert gas["submit_first"] <= 65_000
        assert gas["submit"] <= 65_000
        assert gas["commit_10"] == gas["commit_100"]
        assert gas["commit_first"] > gas["commit_10"]  # the throwaway commit created the balance slot
    for backend in ("eth_tester", "anvil"):
        figures = result[backend]
        assert TX_KEYS <= set(figures)
        assert figures["sequential_tx_s"] > 0
        assert figures["pipelined_tx_s"] > 0
        assert figures["pipelined_speedup"] == pytest.approx(
            figures["pipelined_tx_s"] / figures["sequential_tx_s"]
        )
