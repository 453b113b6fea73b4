"""When a round closes (pure decision) and the running aggregate of an open round.

The decision is a pure function of counts and clocks so that every branch is unit-tested without a broker:
close at quorum; close early once every device that is online has submitted (a device whose last will
fired is not waited for); at the deadline close with at least ``min_updates``, else extend, else skip.
A round therefore always ends: extensions are bounded and skipping needs nothing from anyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from gmpy2 import mpz

from blockdeepnet.config import RoundsConfig
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.paillier import PublicKey


class Decision(StrEnum):
    WAIT = "wait"
    CLOSE = "close"
    EXTEND = "extend"
    SKIP = "skip"


def decide(
    cfg: RoundsConfig,
    *,
    registered: int,
    recorded: int,
    in_flight: int,
    online_missing: int,
    now: float,
    deadline_at: float,
    extensions: int,
) -> tuple[Decision, str]:
    """What to do with the open round now, and why (the reason is logged and kept with skipped rounds).

    ``recorded``: updates on chain; ``in_flight``: accepted but not yet on chain (never closed over: the
    commit's count must equal the contract's); ``online_missing``: devices online that have not submitted.
    """
    quorum = cfg.quorum or registered
    if in_flight:
        return Decision.WAIT, "updates still on their way to the chain"
    if recorded >= quorum:
        return Decision.CLOSE, f"quorum of {quorum} reached"
    if recorded >= cfg.min_updates and online_missing == 0:
        return Decision.CLOSE, f"every online device submitted ({recorded} updates)"
    if now < deadline_at:
        return Decision.WAIT, "waiting for updates"
    if recorded >= cfg.min_updates:
        return Decision.CLOSE, f"deadline reached with {recorded} updates"
    if extensions < cfg.max_extensions:
        return Decision.EXTEND, f"only {recorded} of min {cfg.min_updates} updates at the deadline"
    return Decision.SKIP, (
        f"only {recorded} of min {cfg.min_updates} updates after {extensions} extension(s); round skipped"
    )


@dataclass
class LiveRound:
    """The open round as the gateway holds it in memory; rebuilt from the store after a restart."""

    round: int
    base: bytes
    total_samples: int
    opened_at: float
    deadline_at: float
    extensions: int
    accumulator: Accumulator
    folded: dict[str, int] = field(default_factory=dict)  # device -> samples, on chain and summed in
    submitted: set[str] = field(default_factory=set)  # accepted by the gateway (stored), on chain or not
    last_accepted_at: float | None = None
    last_recorded_at: float | None = None

    @classmethod
    def new(
        cls,
        public_key: PublicKey,
        length: int,
        round_no: int,
        base: bytes,
        total_samples: int,
        opened_at: float,
        deadline_at: float,
        extensions: int = 0,
    ) -> LiveRound:
        return cls(
            round_no, base, total_samples, opened_at, deadline_at, extensions, Accumulator(public_key, length)
        )

    def fold(self, device: str, samples: int, ciphertexts: list[mpz]) -> None:
        """Add one recorded update into the running sum (once per device: a replayed outcome is a no-op)."""
        if device in self.folded:
            return
        self.accumulator.add(ciphertexts, checked=True)  # checked on arrival (validate.ciphertexts)
        self.folded[device] = samples
        self.last_recorded_at = time.time()

    @property
    def weight_num(self) -> int:
        return sum(self.folded.values())
