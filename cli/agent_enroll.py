"""`bdn agent enroll`: join a fleet with the one-time token an operator issued (QR code or text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from cli.errors import fail


@click.command("enroll")
@click.option(
    "--qr", "qr", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG of the QR code."
)
@click.option("--token", default=None, help="The token text (instead of --qr).")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The device's folder: agent.toml, fleet.json, broker credentials are written here.",
)
@click.option(
    "--data-npz",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Local data (.npz x, y).",
)
@click.option(
    "--data-shard", type=int, default=None, help="Use shard K of the Fashion-MNIST split (simulated device)."
)
@click.option(
    "--data-shards", type=int, default=10, show_default=True, help="Number of shards of that split."
)
@click.option("--data-seed", type=int, default=7, show_default=True, help="Seed of that split.")
@click.option(
    "--secrets",
    "backend",
    type=click.Choice(["tpm", "keystore", "files"]),
    default="tpm",
    show_default=True,
    help="Where the device key and key share rest: sealed to the TPM 2.0, an encrypted keystore, or 0600 files.",
)
@click.option("--tcti", default="device:/dev/tpmrm0", show_default=True, help="How to reach the TPM.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keystore passphrase file (mode 0600), for --secrets keystore.",
)
@click.option("--force", is_flag=True, help="Enroll again although agent.toml exists (a new device key).")
def enroll(
    qr: Path | None,
    token: str | None,
    folder: Path,
    data_npz: Path | None,
    data_shard: int | None,
    data_shards: int,
    data_seed: int,
    backend: str,
    tcti: str,
    passphrase_file: Path | None,
    force: bool,
) -> None:
    """Redeem an enrollment token: make this device's key, prove it to the gateway, and receive the fleet,
    MQTT credentials, the broker CA and (for key holders) the key share, encrypted to this device's key.
    Then start the agent with `bdn agent run --config DIR/agent.toml`."""
    from firmware_agent.enroll import EnrollFailed, enroll_device, read_qr

    if (qr is None) == (token is None):
        fail("give the token either as --qr IMAGE.png or as --token TEXT")
    if (data_npz is None) == (data_shard is None):
        fail("say where the local training data is: --data-npz FILE or --data-shard K")
    data: dict[str, Any] = (
        {"source": "npz", "path": str(data_npz.resolve())}
        if data_npz is not None
        else {"source": "fashion-mnist-shard", "shard": data_shard, "shards": data_shards, "seed": data_seed}
    )
    secrets: dict[str, Any] = {"backend": backend}
    if backend == "tpm":
        secrets["tcti"] = tcti
    if backend == "keystore":
        if passphrase_file is None:
            fail("--secrets keystore needs --passphrase-file (mode 0600)")
        secrets["passphrase_file"] = str(passphrase_file.resolve())
    console = Console(stderr=True)
    try:
        text = read_qr(qr) if qr is not None else str(token)
        with console.status("enrolling") as status:
            done = enroll_device(
                text, folder, data=data, secrets=secrets, force=force, progress=lambda s: status.update(s)
            )
    except EnrollFailed as exc:
        fail(str(exc))
    share = f"key holder {done.key_share}" if done.key_share else "no key share"
    click.echo(
        f"enrolled as {done.address} ({share}, {done.samples} samples, secrets in the {done.vault} vault)"
    )
    click.echo(f"start it with: bdn agent run --config {done.config}")
