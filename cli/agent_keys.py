"""`bdn agent keys`: where the device's secrets rest, and moving plain key files into the TPM or a keystore.

``--status`` names the backend (``secrets.backend`` in agent.toml), where it keeps things, which secrets it
holds, and what makes it weaker than a TPM (or that the TPM cannot be reached). ``--import`` reads the plain
``key_file`` / ``share_file`` (checked exactly as the agent checks them: mode 0600, this fleet's key, this
device's share index), stores them in the configured ``tpm`` or ``keystore`` vault, reads them back, and then
either tells the user to delete the plain files or, with ``--remove-plain``, overwrites and deletes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from blockdeepnet.config import AgentConfig, ConfigError, load_agent_config
from cli.errors import fail


@click.command("keys")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The device's agent.toml.",
)
@click.option("--status", "show_status", is_flag=True, help="Show where the secrets rest and which are held.")
@click.option(
    "--import",
    "do_import",
    is_flag=True,
    help="Move key_file / share_file into the configured tpm or keystore backend.",
)
@click.option(
    "--remove-plain",
    is_flag=True,
    help="With --import: overwrite the plain key_file / share_file with random bytes and delete them.",
)
def keys(config_path: Path, show_status: bool, do_import: bool, remove_plain: bool) -> None:
    """Where the device key and key share rest (--status), or seal plain key files (--import).

    Problems (config, permissions, a TPM that cannot be reached, a wrong passphrase) are one line on stderr
    with exit status 2; no secret is ever printed.
    """
    from firmware_agent.errors import AgentSetupError

    if show_status == do_import:
        fail("give exactly one of --status or --import")
    if remove_plain and not do_import:
        fail("--remove-plain goes with --import")
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as exc:
        fail(str(exc))
    try:
        if show_status:
            _show_status(cfg)
        else:
            _import_plain(cfg, remove_plain)
    except AgentSetupError as exc:
        fail(str(exc))


def _show_status(cfg: AgentConfig) -> None:
    from firmware_agent.vault import open_vault

    status = open_vault(cfg).status()
    click.echo(f"backend: {status.kind}")
    click.echo(f"where:   {status.where}")
    click.echo(f"holds:   {', '.join(status.names) if status.names else 'nothing'}")
    if status.warning:
        click.echo(f"warning: {status.warning}")
    elif status.kind == "tpm":
        click.echo("sealed:  to this device's TPM; the sealed files do not unseal on another TPM")


def _import_plain(cfg: AgentConfig, remove_plain: bool) -> None:
    from blockdeepnet.fleet import Fleet, FleetError
    from firmware_agent.errors import AgentSetupError
    from firmware_agent.keys import load_device_key_from, load_key_share_from
    from firmware_agent.vault import DEVICE_KEY, KEY_SHARE, FilesVault, open_vault

    if cfg.secrets.backend == "files":
        fail(
            "secrets.backend is 'files', so there is nowhere to import to: set secrets.backend = 'tpm' (or "
            "'keystore' on a device without a TPM) in agent.toml, then run --import again"
        )
    if cfg.key_file is None:
        fail("key_file is not set in agent.toml: there is no plain device key to import")
    plain = FilesVault(cfg.key_file, cfg.share_file)
    try:
        fleet = Fleet.load(cfg.fleet_file)
    except FleetError as exc:
        fail(str(exc))
    device = load_device_key_from(plain)
    entry = fleet.device(device.address)
    if entry is None:
        fail(f"device {device.address} ({plain.describe(DEVICE_KEY)}) is not listed in {cfg.fleet_file}")
    secrets = [(DEVICE_KEY, device.private_key)]
    if cfg.share_file is not None:
        if entry.key_share == 0:
            fail(f"share_file is set, but fleet.json does not list {device.address} as a key holder")
        load_key_share_from(plain, fleet.public_key, entry.key_share)  # the agent's checks, before sealing
        secrets.append((KEY_SHARE, plain.get(KEY_SHARE)))
    elif entry.key_share:
        fail(
            f"fleet.json lists {device.address} as key holder {entry.key_share}, but share_file is not set: "
            "point it at the share to import"
        )

    vault = open_vault(cfg)
    for name, secret in secrets:
        if vault.has(name):
            try:
                held = vault.get(name)
            except AgentSetupError:
                held = None  # unreadable (sealed by a TPM since cleared, damaged): replacing it is the fix
            if held == secret:
                click.echo(f"{name}: already held in the {vault.kind} vault")
                continue
            if held is not None:
                fail(
                    f"the {vault.kind} vault already holds a different {name} ({vault.location(name)}); "
                    "refusing to replace it: remove it first if that is what you mean"
                )
        vault.put(name, secret)
        if vault.get(name) != secret:
            fail(
                f"{name} does not read back from the {vault.kind} vault as it was stored; the plain file is kept"
            )
        click.echo(f"{name}: stored in {vault.location(name)}")

    plain_files = [p for p in (cfg.key_file, cfg.share_file) if p is not None]
    if remove_plain:
        for path in plain_files:
            _shred(path)
            click.echo(f"removed {path}")
        click.echo(
            "the plain files were overwritten and deleted; on flash storage old copies of their blocks may "
            "survive, so treat a disk image made before this as holding the key"
        )
    else:
        listed = " ".join(str(p) for p in plain_files)
        click.echo(
            f"the plain files still hold the secrets: delete them now (shred -u {listed}) or run again with "
            "--remove-plain; the agent no longer reads them"
        )


def _shred(path: Path) -> None:
    """Overwrite ``path`` with random bytes, fsync, and unlink it: best effort against reading the old blocks
    back from the same file system (flash wear levelling and copy-on-write file systems may keep copies)."""
    from firmware_agent.errors import AgentSetupError

    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            size = os.fstat(fd).st_size
            os.write(fd, os.urandom(size))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)
    except OSError as exc:
        raise AgentSetupError(f"cannot remove plain file {path}: {exc.strerror}; delete it by hand") from None
