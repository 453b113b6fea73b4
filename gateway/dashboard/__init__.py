"""The operator dashboard served by the gateway's HTTP endpoint (``/dashboard``): fleet, rounds, chain, audits
and rejected messages, as server-rendered pages that refresh themselves (docs/dashboard.md)."""

from gateway.dashboard.views import add_routes

__all__ = ["add_routes"]
