"""`bdn provision install-service`: a daemon as a hardened systemd service (registered in cli/provision.py)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from cli.errors import fail
from provisioning.services import (
    DEFAULT_USER,
    ROLES,
    UNIT_DIR,
    ServiceInstallError,
    as_role,
    default_bdn_path,
    plan_install,
    run_plan,
    unit_name,
)


@click.command("install-service")
@click.argument("role", type=click.Choice(ROLES))
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The daemon's gateway.toml / agent.toml (chain-dev takes none). Copied into /etc/bdn/ROLE/.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the steps (and the unit and config written) and do nothing."
)
@click.option("--user", default=DEFAULT_USER, show_default=True, help="System user the service runs as.")
@click.option(
    "--unit-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=UNIT_DIR,
    show_default=True,
    help="Where the unit file goes.",
)
@click.option(
    "--bdn",
    "bdn_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The bdn executable the unit runs [default: this one].",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    help="Install into this tree (e.g. a device's SD card), enabled offline with systemctl --root.",
)
@click.option("--no-enable", is_flag=True, help="Write the files only; do not run systemctl.")
def install_service(
    role: str,
    config: Path | None,
    dry_run: bool,
    user: str,
    unit_dir: Path,
    bdn_path: Path | None,
    root: Path,
    no_enable: bool,
) -> None:
    """Install ROLE (gateway, agent or chain-dev) as bdn-ROLE.service and enable it.

    Creates the system user if missing, copies the configuration and the files it names into /etc/bdn/ROLE/
    (files the daemon rewrites into /var/lib/bdn/ROLE/), writes the unit with this bdn's path, then
    `systemctl daemon-reload` and `systemctl enable --now`. Safe to run again: the daemon's state is kept.
    """
    if not unit_dir.is_absolute():
        fail("--unit-dir must be an absolute path")
    root = root.absolute()
    try:
        steps = plan_install(
            as_role(role),
            config,
            (bdn_path or default_bdn_path()).absolute(),
            user=user,
            unit_dir=unit_dir,
            root=root,
            enable=not no_enable,
        )
    except ServiceInstallError as exc:
        fail(str(exc))
    unit = unit_name(as_role(role))
    if dry_run:
        click.echo(f"bdn provision install-service {role} would:")
        for k, step in enumerate(steps, 1):
            click.echo(f"  {k}. {step.describe()}")
        for step in steps:
            shown = step.shown()
            if shown is not None:
                click.echo(f"\n--- {shown[0]}\n{shown[1].rstrip()}")
        return
    if root == Path("/") and os.geteuid() != 0:
        fail("installing a service needs root (sudo); --dry-run shows what would be done")
    try:
        run_plan(steps, echo=click.echo)
    except ServiceInstallError as exc:
        fail(str(exc))
    if no_enable:
        click.echo(f"{unit} written; not enabled (--no-enable)")
    elif root != Path("/"):
        click.echo(f"{unit} installed in {root}; it starts when that system boots")
    else:
        click.echo(f"{unit} enabled and starting: `systemctl status {unit}`, `journalctl -u {unit} -f`")
