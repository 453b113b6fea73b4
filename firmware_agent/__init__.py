"""Device agent: MQTT client, trainer, encrypt + sign + publish, key-share duty, local combine (DESIGN §7).

Modules, one job each: :mod:`keys` (device key and key share files), :mod:`trainer` (local data and
training), :mod:`state` (crash-safe persistent state), :mod:`crypto_duty` (encrypt + sign, partial decryption,
share verification and combination, holder rotation), :mod:`chainview` (read-only check of a global block
against the contract), :mod:`agent` (the :class:`Agent` daemon), :mod:`service` (running one as a process).
"""

from firmware_agent.agent import Agent, EventHook
from firmware_agent.errors import AgentSetupError

__all__ = ["Agent", "AgentSetupError", "EventHook"]
