"""Chain relay: sends the outbox's stored updates to the contract, pipelined, and reports each outcome.

The outbox row is written in the same database transaction as the update (before the MQTT ack), so an update
the gateway acknowledged is either on chain or still in the outbox, whatever crashes when. Sending is
idempotent by (round, device): the contract refuses a second submission, and a ``DuplicateSubmission`` whose
recorded payload hash is ours means "already there" (a send whose receipt we never saw), resolved by finding
the original transaction in the contract's events. The chain, not our bookkeeping, is the truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from blockdeepnet.ledger import ContractRejected, Ledger, LedgerError, SignedUpdate
from gateway.chain import ChainLink
from gateway.waiting import wait_event

log = logging.getLogger("bdn.gateway.relay")


@dataclass(frozen=True)
class Recorded:
    round: int
    device: str
    tx_hash: bytes
    block_number: int
    log_index: int
    gas_used: int


@dataclass(frozen=True)
class Refused:
    round: int
    device: str
    error: str


Outcome = Recorded | Refused


def _recorded(u: SignedUpdate, receipt: dict[str, Any]) -> Recorded:
    logs = receipt.get("logs") or []
    return Recorded(
        u.round,
        u.device,
        bytes(receipt["transactionHash"]),
        int(receipt["blockNumber"]),
        int(logs[0]["logIndex"]) if logs else 0,
        int(receipt["gasUsed"]),
    )


def _on_chain(ledger: Ledger, updates: list[SignedUpdate]) -> dict[tuple[int, str], Recorded]:
    """The updates of ``updates`` that the contract already holds (same payload hash), with their transaction."""
    found: dict[tuple[int, str], Recorded] = {}
    wanted = {(u.round, u.device): u.payload_hash for u in updates}
    for round_no in {u.round for u in updates}:
        for e in ledger.update_events(round_no):
            if wanted.get((round_no, e.device)) == e.payload_hash:
                found[(round_no, e.device)] = Recorded(
                    round_no, e.device, e.tx_hash, e.block_number, e.log_index, 0
                )
    return found


def send_batch(ledger: Ledger, updates: list[SignedUpdate], *, reconcile: bool = False) -> list[Outcome]:
    """Relay a batch (runs in the chain thread). Transport failures propagate: the rows stay pending.

    ``reconcile``: first look the updates up on chain and send only the missing ones. The relay does that for
    what it finds pending after a start (or a chain outage): sent before a crash, they may be mined already,
    and a second transaction for them would only revert."""
    if reconcile:
        known = _on_chain(ledger, updates)
        rest = [u for u in updates if (u.round, u.device) not in known]
        sent = iter(send_batch(ledger, rest) if rest else [])
        return [known.get((u.round, u.device)) or next(sent) for u in updates]
    results: list[dict[str, Any] | ContractRejected]
    try:
        results = ledger.send_many([ledger.submit_call(u) for u in updates])
    except ContractRejected:
        # A node that executes on send (eth-tester) refuses a reverting tx right there, ending the pipelined
        # batch; the ones already sent are mined. One by one then: each resend of a mined one is a duplicate.
        results = []
        for u in updates:
            try:
                results.append(ledger.transact(ledger.submit_call(u)))
            except ContractRejected as exc:
                results.append(exc)
    out: list[Outcome] = []
    events: dict[int, dict[str, Any]] = {}
    for u, result in zip(updates, results, strict=True):
        if isinstance(result, dict):
            out.append(_recorded(u, result))
            continue
        if result.error == "DuplicateSubmission":
            if u.round not in events:
                events[u.round] = {e.device: e for e in ledger.update_events(u.round)}
            found = events[u.round].get(u.device)
            if found is not None and found.payload_hash == u.payload_hash:
                out.append(Recorded(u.round, u.device, found.tx_hash, found.block_number, found.log_index, 0))
                continue
        out.append(Refused(u.round, u.device, _describe(result)))
    return out


def _describe(rejected: ContractRejected) -> str:
    args = ", ".join(str(a) for a in rejected.args_)
    return f"contract refused: {rejected.error}({args})"


class Relay:
    """Drains the ``submit`` outbox in batches; ``outcome`` is awaited for every update, in chain order."""

    def __init__(
        self,
        chain: ChainLink,
        load_pending: Callable[[int], Awaitable[list[SignedUpdate]]],
        outcome: Callable[[list[Outcome]], Awaitable[None]],
        *,
        batch: int = 64,
    ) -> None:
        self.chain = chain
        self.load_pending = load_pending
        self.outcome = outcome
        self.batch = batch
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.healthy = True
        self._reconcile = True  # what is pending at start may have been sent before a crash

    async def run(self) -> None:
        backoff = 0.2
        while True:
            pending = await self.load_pending(self.batch)
            if not pending:
                self.idle.set()
                self.wake.clear()
                await wait_event(self.wake, 1.0)
                continue
            self.idle.clear()
            try:
                outcomes = await self.chain.call(
                    lambda lg, p=pending, r=self._reconcile: send_batch(lg, p, reconcile=r)
                )
            except LedgerError as exc:
                # The node is down or flaky: keep everything pending and try again, backing off.
                self.healthy = False
                self._reconcile = True  # the batch may have been half sent: look before resending
                log.warning("chain unavailable, %d update(s) wait in the outbox: %s", len(pending), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.healthy = True
            # Keep looking first while batches come back full: the backlog found at start may be longer.
            self._reconcile = self._reconcile and len(pending) == self.batch
            backoff = 0.2
            await self.outcome(outcomes)
