"""`bdn gateway run`: the edge gateway daemon."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from blockdeepnet.config import ConfigError, load_gateway_config
from blockdeepnet.contract import LedgerError
from blockdeepnet.fleet import Fleet, FleetError
from blockdeepnet.logs import setup_logging
from cli.log_options import fatal, log_format_option, log_level_option


@click.group()
def gateway() -> None:
    """The edge gateway: validates devices' encrypted updates, records them on chain, aggregates, republishes."""


@gateway.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="gateway.toml (fleet file, keys, broker, store, rounds, http).",
)
@log_level_option
@log_format_option
def run(config_path: Path, log_level: str, log_format: str) -> None:
    """Run the gateway until SIGTERM/SIGINT (or rounds.max_rounds committed rounds)."""
    from gateway.broker import BrokerError
    from gateway.mqtt import MqttError
    from gateway.service import Gateway, GatewayError
    from gateway.store import StoreError

    log_format = setup_logging(log_level, log_format)
    try:
        cfg = load_gateway_config(config_path)
        fleet = Fleet.load(cfg.fleet_file)
    except (ConfigError, FleetError) as exc:
        fatal(str(exc), log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(cfg, fleet).run(stop)

    try:
        asyncio.run(main())
    except (GatewayError, LedgerError, StoreError, BrokerError, MqttError, OSError) as exc:
        fatal(str(exc), log_format)
