"""Running one agent as a foreground daemon from ``agent.toml`` (``bdn agent run`` and ``python -m firmware_agent``).

Kept apart from :class:`~firmware_agent.agent.Agent` so the class stays free of process-wide concerns
(signal handlers, logging set-up) and several agents can share one process in a demo or test.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

from blockdeepnet.config import ConfigError, load_agent_config
from blockdeepnet.ledger import LedgerError
from firmware_agent.agent import Agent, EventHook
from firmware_agent.errors import AgentSetupError


def build_agent(config_path: Path, on_event: EventHook | None = None) -> Agent:
    """Load and validate ``config_path`` and construct its agent; every problem is an AgentSetupError."""
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        raise AgentSetupError(str(exc)) from None
    try:
        return Agent(cfg, on_event=on_event)
    except LedgerError as exc:  # the contract artifact (ABI) is missing or malformed
        raise AgentSetupError(str(exc)) from None


def run_forever(agent: Agent) -> None:
    """Run ``agent`` in this (main) thread until SIGTERM or SIGINT; both stop it cleanly.

    The handlers only set the agent's stop flag (no locks taken in a signal handler); the agent notices it
    within a fraction of a second, or after the step in progress (a partial decryption can take a minute).
    """

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        agent.stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
