"""Running one agent as a foreground daemon from ``agent.toml`` (``bdn agent run`` and ``python -m firmware_agent``).

Kept apart from :class:`~firmware_agent.agent.Agent` so the class stays free of process-wide concerns
(signal handlers, logging set-up, the GPIO pins of the status LED and button) and several agents can share one
process in a demo or test.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from blockdeepnet.config import ConfigError, load_agent_config
from blockdeepnet.contract import LedgerError
from blockdeepnet.logs import fields
from firmware_agent.agent import Agent, EventHook
from firmware_agent.errors import AgentSetupError
from firmware_agent.status_led import StatusIndicator, create_indicator

logger = logging.getLogger("firmware_agent.service")


def build_agent(config_path: Path, on_event: EventHook | None = None) -> Agent:
    """Load and validate ``config_path`` and construct its agent; every problem is an AgentSetupError.

    The status LED and button of ``[status]`` are set up here too, so an unusable ``gpio`` backend is a set-up
    error like any other. The indicator follows the agent's events (next to ``on_event``, if given) and
    releases its pins on the agent's ``stopped`` event; its button logs the agent's status.
    """
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        raise AgentSetupError(str(exc)) from None
    indicator = create_indicator(cfg.status)
    hooks = [hook for hook in (indicator.on_event if indicator else None, on_event) if hook is not None]
    try:
        agent = Agent(cfg, on_event=_fan_out(hooks))
    except BaseException as exc:
        if indicator is not None:
            indicator.close()  # release the pins: no agent will ever emit "stopped"
        if isinstance(exc, LedgerError):  # the contract artifact (ABI) is missing or malformed
            raise AgentSetupError(str(exc)) from None
        raise
    if indicator is not None:
        indicator.on_press = lambda: _button_pressed(agent, indicator)
    return agent


def _fan_out(hooks: list[EventHook]) -> EventHook | None:
    """One event hook calling each of ``hooks``, so a failing one does not keep the event from the others."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def _all(name: str, data: dict[str, Any]) -> None:
        for hook in hooks:
            try:
                hook(name, data)
            except Exception:
                logger.exception("event hook %r failed on %r", hook, name)

    return _all


def _button_pressed(agent: Agent, indicator: StatusIndicator) -> None:
    """A press of the status button: log where the device stands, and take part in the next round (with
    ``status.join = "button"``; with ``auto`` the agent joins every round anyway)."""
    agent.request_join()
    seen = indicator.last_round
    logger.info(
        "status button: device %s, %s, latest round seen %s, applied round %d (model %s), LED %s; "
        "the agent joins the next round that builds on its model",
        agent.address,
        f"key holder {agent.holder_index}" if agent.is_holder else "not a key holder",
        "none yet" if seen is None else seen,
        agent.applied_round,
        agent.base_hash.hex()[:16],
        indicator.state.value,
        extra=fields(device=agent.address),
    )


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
