"""`bdn provision`: the operator's tools on the gateway host (fleet set-up, device enrollment, services)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from cli.errors import fail


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def provision() -> None:
    """Set a fleet up, enroll devices, install the services."""


@provision.command("init")
@click.option(
    "--fleet", "name", required=True, help="Fleet name (A-Z a-z 0-9 _ -), also the MQTT topic prefix."
)
@click.option("--key-holders", "holders", type=int, required=True, help="l: devices that get a key share.")
@click.option("--threshold", type=int, required=True, help="t: key shares needed to decrypt an aggregate.")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Fleet folder to create [default: ./<fleet>].",
)
@click.option(
    "--chain",
    "chain",
    default="embedded",
    show_default=True,
    metavar="embedded|rpc",
    help="Where the contract lives: 'embedded' (in the gateway; demo) or 'rpc' with --chain-url.",
)
@click.option("--chain-url", default=None, help="JSON-RPC URL of the QBFT/anvil node for --chain rpc.")
@click.option(
    "--broker",
    type=click.Choice(["mosquitto", "embedded"]),
    default="mosquitto",
    show_default=True,
    help="Mosquitto (config, TLS certificate, password file and ACL are written) or the gateway's own broker.",
)
@click.option("--broker-host", default="127.0.0.1", show_default=True, help="Address the broker listens on.")
@click.option(
    "--broker-port", type=int, default=8883, show_default=True, help="Broker port (TLS for Mosquitto)."
)
@click.option(
    "--http-host", default="127.0.0.1", show_default=True, help="Gateway HTTP address (enrollment)."
)
@click.option("--http-port", type=int, default=8080, show_default=True, help="Gateway HTTP port.")
@click.option(
    "--hostname", "hostnames", multiple=True, help="Extra name/IP for the certificates (repeatable)."
)
@click.option(
    "--devices", "min_devices", type=int, default=0, help="Round 1 waits for this many enrolled devices."
)
@click.option("--key-bits", type=int, default=2048, show_default=True, help="Paillier modulus size.")
@click.option("--owner", default="", help="Service user to own the folder (needs root) [default: you].")
@click.option("--force", is_flag=True, help="Move an existing fleet folder aside and start over.")
def init(
    name: str,
    holders: int,
    threshold: int,
    root: Path | None,
    chain: str,
    chain_url: str | None,
    broker: str,
    broker_host: str,
    broker_port: int,
    http_host: str,
    http_port: int,
    hostnames: tuple[str, ...],
    min_devices: int,
    key_bits: int,
    owner: str,
    force: bool,
) -> None:
    """Create a fleet folder: the threshold key dealt into l shares, the gateway's key, the contract
    (deployed now with --chain rpc), a CA with broker and gateway certificates, Mosquitto's config, password
    file and ACL, and gateway.toml. Refuses to touch an existing fleet unless --force."""
    from provisioning.fleet_init import InitError, InitOptions, init_fleet

    if chain not in ("embedded", "rpc"):
        fail(f"--chain must be 'embedded' or 'rpc', got {chain!r}")
    if chain == "rpc" and not chain_url:
        fail("--chain rpc needs --chain-url http://node:8545")
    console = Console(stderr=True, soft_wrap=True)  # paths stay whole in logs
    opts = InitOptions(
        name=name,
        root=root or Path(name),
        holders=holders,
        threshold=threshold,
        key_bits=key_bits,
        chain_url=chain_url if chain == "rpc" else None,
        broker=broker,
        broker_host=broker_host,
        broker_port=broker_port,
        http_host=http_host,
        http_port=http_port,
        min_devices=min_devices,
        owner=owner,
        hostnames=hostnames,
        force=force,
    )
    try:
        with console.status("setting the fleet up") as status:
            result = init_fleet(opts, progress=lambda text: status.update(text))
    except InitError as exc:
        fail(str(exc))
    if result.moved_aside is not None:
        console.print(f"the previous fleet folder was moved to {result.moved_aside}")
    console.print(f"[bold]fleet {name}[/] created in {result.root}")
    console.print(f"  gateway  bdn gateway run --config {result.gateway_config}")
    if result.mosquitto_config is not None:
        console.print(f"  broker   mosquitto -c {result.mosquitto_config}")
    console.print(f"  devices  bdn provision enroll --dir {result.root} --device NAME")


@provision.command("enroll")
@click.option("--device", required=True, help="The new device's name (unique in the fleet).")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The fleet folder made by `bdn provision init`.",
)
@click.option(
    "--key-share",
    default="auto",
    show_default=True,
    help="'auto' (a free share while any is left), 'none', or a holder index.",
)
@click.option(
    "--ttl", "ttl_h", type=float, default=24.0, show_default=True, help="Hours the token stays valid."
)
@click.option(
    "--gateway-url", default="", help="URL devices reach the gateway at [default: from gateway.toml]."
)
@click.option(
    "--png", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where to save the QR PNG."
)
def enroll(root: Path, device: str, key_share: str, ttl_h: float, gateway_url: str, png: Path | None) -> None:
    """Issue a one-time enrollment token for a device: shown as a QR code here and saved as PNG. On the
    device: `bdn agent enroll --qr FILE.png` (or --token TEXT)."""
    from provisioning.enroll_token import TokenError, issue_enrollment

    if not ttl_h > 0:
        fail("--ttl must be positive")
    try:
        issued = issue_enrollment(
            root, device, key_share=key_share, ttl_s=int(ttl_h * 3600), gateway_url=gateway_url, png=png
        )
    except TokenError as exc:
        fail(str(exc))
    out = sys.stdout
    if out.isatty():
        out.write(issued.terminal)
    share = f"key share {issued.token.key_share}" if issued.token.key_share else "no key share"
    out.write(f"device {device}: token for {issued.token.gateway_url}, {share}, valid {ttl_h:g} h\n")
    out.write(f"QR code saved to {issued.png}\n")
    out.write(f"token: {issued.text}\n")


@provision.command("mosquitto-bridge")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=Path("gateway.toml"),
    show_default=True,
    help="The gateway config whose [bridge] section to translate.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the stanza to this new file (mode 0600) instead of printing it.",
)
def mosquitto_bridge(config_path: Path, output: Path | None) -> None:
    """Print the native Mosquitto bridge stanza equivalent to [bridge], for sites that prefer the broker to
    bridge (then set bridge.enabled = false)."""
    from blockdeepnet.config import ConfigError, load_gateway_config
    from blockdeepnet.fleet import Fleet, FleetError
    from provisioning.mosquitto_bridge import StanzaError, bridge_stanza
    from provisioning.private_files import write_private

    try:
        cfg = load_gateway_config(config_path)
        text = bridge_stanza(cfg.bridge, Fleet.load(cfg.fleet_file).name, source=str(config_path))
    except (ConfigError, FleetError, StanzaError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read the fleet file: {exc}")
    if output is None:
        if cfg.bridge.password_file is not None:
            Console(stderr=True).print(
                "[yellow]warning:[/] the stanza holds the plant password: keep it in a file only mosquitto "
                "can read (mode 0600), or use --output FILE",
                highlight=False,
            )
        sys.stdout.write(text)
        return
    try:
        write_private(output, text)
    except FileExistsError:
        fail(f"{output} exists; remove it or choose another --output")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")
    click.echo(f"Mosquitto bridge stanza written to {output} (mode 0600)")


from cli.provision_service import install_service  # noqa: E402  (its own module; registered on the group above)

provision.add_command(install_service)
