"""`bdn chain`: the ledger's networks. ``genesis`` writes a QBFT network for a gateway consortium."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import IO, Any, cast

import click

from provisioning.genesis import (
    CLIENTS,
    DEFAULT_BLOCK_PERIOD_S,
    DEFAULT_CHAIN_ID,
    Client,
    ConsortiumExistsError,
    ConsortiumFiles,
    QbftGenesisWarning,
    write_consortium,
)


class ChainError(click.ClickException):
    """One-line error, exit status 2 (bad input or configuration), no traceback."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def chain() -> None:
    """The permissioned chain the ledger runs on."""


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def start_command(files: ConsortiumFiles, index: int = 0) -> list[str]:
    """Shell commands that start validator ``index`` (0-based) of a written consortium. No secrets in them:
    the node reads its key from the 0600 file."""
    v = files.validators[index]
    data = v.directory / "data"
    if files.client == "besu":
        return [
            " ".join(
                [
                    "besu",
                    f"--data-path={_q(data)}",
                    f"--genesis-file={_q(files.genesis)}",
                    f"--node-private-key-file={_q(v.key)}",
                    "--min-gas-price=0",
                    "--rpc-http-enabled",
                    "--rpc-http-api=ETH,NET,WEB3,QBFT",
                    "--p2p-port=30303",
                    "--rpc-http-port=8545",
                ]
            )
        ]
    return [
        f"geth --datadir {_q(data)} init {_q(files.genesis)}",
        " ".join(
            [
                "geth",
                f"--datadir {_q(data)}",
                f"--nodekey {_q(v.key)}",
                f"--networkid {files.chain_id}",
                "--syncmode full",
                "--mine --miner.threads 1",
                "--emitcheckpoints",
                "--port 30303",
                "--http --http.port 8545 --http.api eth,net,web3,istanbul",
            ]
        ),
    ]


@chain.command("genesis")
@click.option(
    "--validators",
    "n_validators",
    type=int,
    default=4,
    show_default=True,
    help="Validators (one per consortium gateway); 4 or more tolerate a faulty one.",
)
@click.option(
    "--client", type=click.Choice(CLIENTS), default="besu", show_default=True, help="Node software."
)
@click.option("--chain-id", type=int, default=DEFAULT_CHAIN_ID, show_default=True, help="EIP-155 chain id.")
@click.option(
    "--block-period",
    type=int,
    default=DEFAULT_BLOCK_PERIOD_S,
    show_default=True,
    help="Seconds between blocks.",
)
@click.option("--gateway", "gateway", default=None, metavar="ADDRESS", help="Pre-fund this gateway address.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("qbft-network"),
    show_default=True,
    help="Directory to write genesis.json and validator-N/ into.",
)
@click.option(
    "--force", is_flag=True, help="Replace a consortium already written in --out (its keys are lost)."
)
def genesis(
    n_validators: int,
    client: str,
    chain_id: int,
    block_period: int,
    gateway: str | None,
    out_dir: Path,
    force: bool,
) -> None:
    """Write a QBFT genesis (validators in extraData, block period, chain id) and the validators' node keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QbftGenesisWarning)
        try:
            files = write_consortium(
                out_dir,
                n_validators,
                cast(Client, client),
                chain_id,
                block_period,
                gateway_address=gateway,
                force=force,
            )
        except ConsortiumExistsError:
            raise ChainError(
                f"{out_dir} is not empty; choose another --out or pass --force to replace the consortium "
                "in it (its validator keys are lost)"
            ) from None
        except (ValueError, OSError) as exc:
            raise ChainError(str(exc)) from None
    for w in caught:
        if issubclass(w.category, QbftGenesisWarning):
            click.echo(f"warning: {w.message}", err=True)

    n = len(files.validators)
    click.echo(
        f"QBFT network for {client}: chain id {files.chain_id}, {n} validator(s) "
        f"(tolerates {files.fault_tolerance} faulty), one block every {block_period} s"
    )
    click.echo(f"  {files.genesis}")
    for v in files.validators:
        click.echo(f"  {v.directory}/  {v.address}  (key: mode 0600)")
    if gateway:
        click.echo(f"  gateway {gateway} pre-funded in alloc")
    click.echo("Keep each validator-N/ directory on its own gateway; the key files never leave it.")
    click.echo("Start the first validator with:")
    for line in start_command(files):
        click.echo(f"  {line}")
    if n > 1:
        click.echo(
            "and the others with --bootnodes enode://<validator-1/key.pub without 0x>@<its host>:30303 "
            "(README: A QBFT chain for production)."
        )


@chain.command("dev")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("./bdn-chain"),
    show_default=True,
    help="Where the chain state, gateway key (0600) and deployment record live.",
)
@click.option(
    "--port",
    type=int,
    default=8545,
    show_default=True,
    help="JSON-RPC port on 127.0.0.1 (an error if taken).",
)
def dev(data_dir: Path, port: int) -> None:
    """A persistent local dev chain: anvil (london, zero gas price, FIFO) with the contract deployed.

    Runs in the foreground until Ctrl-C / SIGTERM; the chain state is saved on exit and reloaded next time,
    so the deployment and everything recorded survive restarts.
    """
    import signal
    import threading

    from blockdeepnet import sdnotify
    from provisioning.anvil import AnvilError
    from provisioning.devchain import start_dev_chain

    # Installed before anything starts, so a SIGTERM at any point stops the node cleanly (state saved).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        node, deployment = start_dev_chain(data_dir, port)
    except (AnvilError, PermissionError) as exc:
        raise ChainError(str(exc)) from None
    click.echo(f"dev chain on {deployment.rpc_url} (chain id {deployment.chain_id})")
    click.echo(f"contract  {deployment.contract}  (deployed in block {deployment.deploy_block})")
    click.echo(f"gateway   {deployment.gateway}  (key in {data_dir / 'gateway.key'})")
    sdnotify.ready(f"dev chain on {deployment.rpc_url}, contract {deployment.contract}")
    watchdog = sdnotify.Watchdog.from_env()  # bdn-chain-dev.service: pinged only while anvil answers
    try:
        while not stop.is_set() and node.proc is not None and node.proc.poll() is None:
            if watchdog.due() and node.rpc("eth_blockNumber") is not None:
                watchdog.kick()
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        sdnotify.stopping()
        node.stop()
    if node.proc is not None and node.proc.returncode not in (0, -15, None) and not stop.is_set():
        raise ChainError(f"anvil exited unexpectedly with code {node.proc.returncode}")
    click.echo(f"stopped; state saved in {data_dir / 'anvil-state.json'}")
