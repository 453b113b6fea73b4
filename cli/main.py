"""`bdn`: one command line for every role. Subcommands grow with the product (gateway, agent, provision...)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from blockdeepnet import __version__
from blockdeepnet.data import DatasetError
from cli.agent import agent
from cli.chain import chain
from cli.errors import fail
from cli.gateway import gateway
from cli.provision import provision


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bdn")
def cli() -> None:
    """BlockDeepNet: devices learn one model together over MQTT, with threshold-Paillier-encrypted updates
    recorded on a permissioned Ethereum chain."""


@cli.command()
@click.option(
    "--devices", default=10, show_default=True, help="Number of simulated devices (worker processes)."
)
@click.option("--rounds", default=3, show_default=True, help="Federated rounds to run.")
@click.option(
    "--non-iid", "non_iid", type=int, default=None, help="Give each device only K classes (default: IID)."
)
@click.option(
    "--encrypted/--plaintext",
    default=True,
    show_default=True,
    help="Encrypt every update under a t-of-l threshold Paillier key, or aggregate in the clear.",
)
@click.option("--seed", default=7, show_default=True, help="Seed for data split, initial model and batches.")
@click.option(
    "--rule",
    type=click.Choice(["fedavg", "eq3"]),
    default="fedavg",
    show_default=True,
    help="Local update: FedAvg SGD or the paper's variance-reduced Eq. 3.",
)
@click.option("--lr", default=0.2, show_default=True, help="Local learning rate.")
@click.option("--batch-size", default=32, show_default=True, help="Local minibatch size.")
@click.option("--local-epochs", default=1, show_default=True, help="Local epochs per round.")
@click.option(
    "--samples-per-device",
    type=int,
    default=None,
    help="Shard size (default: the paper's 2,745, fewer if the data runs out).",
)
@click.option(
    "--key-bits",
    default=2048,
    show_default=True,
    help="Paillier modulus size (below 2048 only for experiments).",
)
@click.option(
    "--threshold", "threshold", default=2, show_default=True, help="t: key holders needed to decrypt."
)
@click.option("--holders", default=3, show_default=True, help="l: key holders the key is dealt to.")
@click.option("--clip", default=1.0, show_default=True, help="Updates are clipped to ±clip before encoding.")
@click.option(
    "--value-bits",
    default=16,
    show_default=True,
    help="Bits per slot sum; 2^b - max_devices quantization levels span [-clip, clip].",
)
@click.option(
    "--eps", default=0.0, show_default=True, help="Stop early when ||w^p - w^{p-1}|| <= eps (0: never)."
)
@click.option("--workers", type=int, default=None, help="Worker processes (default: CPU count).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Fashion-MNIST IDX folder (default: Debian's).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of progress and a table."
)
def simulate(as_json: bool, workers: int | None, **options: Any) -> None:
    """Federated training of the paper's CNN on Fashion-MNIST, all devices on this machine.

    With --encrypted every update really goes encrypt -> homomorphic weighted sum -> t-of-l threshold
    decryption with verified partial decryptions.
    """
    from cli.simulation import SimulationConfig, expected_minutes, run_simulation

    if workers is not None:
        options["workers"] = workers
    cfg = SimulationConfig(**options)
    try:
        cfg.validate()
    except ValueError as exc:
        fail(str(exc))
    console = Console(stderr=True)
    if as_json:
        progress_cb = None
        bar = None
    else:
        mode = (
            f"encrypted (t={cfg.threshold} of l={cfg.holders}, {cfg.key_bits}-bit key)"
            if cfg.encrypted
            else "plaintext"
        )
        console.print(
            f"[bold]bdn simulate[/]: {cfg.devices} devices, {cfg.rounds} rounds, {mode}"
            f" - expect about {expected_minutes(cfg):.0f} min on 2 cores"
        )
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        tasks: dict[str, Any] = {}

        def progress_cb(event: str, data: dict[str, Any]) -> None:
            if event == "keygen":
                console.print(f"dealing a {data['bits']}-bit key to {data['l']} holders (t={data['t']})...")
            elif event == "round_start":
                step = "training + encrypting" if cfg.encrypted else "training"
                tasks["train"] = bar.add_task(f"round {data['round']}: {step}", total=data["devices"])
            elif event == "device_done":
                bar.advance(tasks["train"])
            elif event == "decrypt_start":
                tasks["dec"] = bar.add_task(
                    f"round {data['round']}: threshold decryption ({data['holders']} holders)", total=None
                )
            elif event == "round_done":
                if "dec" in tasks:
                    bar.update(tasks.pop("dec"), total=1, completed=1)
                console.print(
                    f"round {data['round']}: global accuracy {data['global_accuracy']:.2%}, "
                    f"loss {data['global_loss']:.4f}, {data['seconds']:.1f} s"
                )
            elif event == "local_only_start":
                tasks["local"] = bar.add_task("local-only baseline (each device alone)", total=None)
            elif event == "local_only_done":
                bar.update(tasks.pop("local"), total=1, completed=1)

    try:
        if bar is not None:
            with bar:
                result = run_simulation(cfg, progress_cb)
        else:
            result = run_simulation(cfg, progress_cb)
    except DatasetError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"BlockDeepNet simulation ({result['mode']})")
    for col in (
        "round",
        "global accuracy",
        "alone, same epochs",
        "global loss",
        "seconds",
        "bytes on the wire",
    ):
        table.add_column(col, justify="right")
    for r, alone in zip(result["rounds"], result["local_accuracy_curve"], strict=True):
        table.add_row(
            str(r["round"]),
            f"{r['global_accuracy']:.2%}",
            f"{alone:.2%}",
            f"{r['global_loss']:.4f}",
            f"{r['seconds']:.1f}",
            f"{r['wire_bytes']:,}",
        )
    Console().print(table)
    Console().print(
        f"final model: round {result['final_round']} (lowest global loss), test accuracy {result['final_accuracy']:.2%}; "
        f"each device alone: {result['local_accuracy_mean']:.2%} on average"
    )


@cli.group()
def bench() -> None:
    """Benchmarks that print one JSON object, each with its baseline measured in the same run."""


@bench.command("crypto")
@click.option("--key-bits", default=2048, show_default=True, help="Paillier modulus size.")
@click.option(
    "--params", default=252_398, show_default=True, help="Update length (the paper's CNN by default)."
)
@click.option(
    "--naive-sample", default=20, show_default=True, help="phe encryptions timed for the naive baseline."
)
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON object.")
def bench_crypto(key_bits: int, params: int, naive_sample: int, as_json: bool) -> None:
    """Packed threshold Paillier on one update: encrypt, aggregate, partial decrypt, combine (one core)."""
    from bench.crypto import run

    console = Console(stderr=True)
    log = None if as_json else (lambda msg: console.print(msg, highlight=False))
    result = run(key_bits=key_bits, params=params, naive_sample=naive_sample, log=log)
    click.echo(json.dumps(result, indent=None if as_json else 2))


@bench.command("chain")
@click.option("--tx-count", default=60, show_default=True, help="Transactions per throughput measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON object.")
def bench_chain(tx_count: int, as_json: bool) -> None:
    """Gas of every contract operation, and sequential vs pipelined tx/s on eth-tester and on anvil."""
    from bench.chain import run

    console = Console(stderr=True)
    log = None if as_json else (lambda msg: console.print(msg, highlight=False))
    result = run(tx_count=tx_count, log=log)
    click.echo(json.dumps(result, indent=None if as_json else 2))


@bench.command("round")
@click.option(
    "--devices",
    default="5,10,20,50",
    show_default=True,
    help="Comma-separated publisher counts, one fresh gateway and round each.",
)
@click.option(
    "--broker",
    "brokers",
    type=click.Choice(["mosquitto", "amqtt"]),
    multiple=True,
    default=("mosquitto", "amqtt"),
    show_default=True,
    help="mosquitto = the machine's broker on 127.0.0.1:1883; amqtt = the embedded one. Repeatable.",
)
@click.option("--key-bits", default=2048, show_default=True, help="Paillier modulus size.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON object.")
def bench_round(devices: str, brokers: tuple[str, ...], key_bits: int, as_json: bool) -> None:
    """Gateway close latency, round wall time and ingest rate for N publishers of pre-made full-size updates."""
    from bench.round import run_round_bench

    try:
        counts = tuple(sorted({int(n) for n in devices.split(",")}))
    except ValueError:
        fail(f"--devices must be comma-separated integers, got {devices!r}")
    if not counts or counts[0] < 1 or counts[-1] > 100:
        fail("--devices counts must lie in 1..100 (the codec layout's max_devices)")
    console = Console(stderr=True)
    log = None if as_json else (lambda msg: console.print(msg, highlight=False))
    result = run_round_bench(counts, brokers, key_bits, progress=log)
    click.echo(json.dumps(result, indent=None if as_json else 2))


@bench.command("device")
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=1500,
    show_default=True,
    help="Local minibatch steps of the measured round (the paper's 1,500).",
)
@click.option("--key-bits", default=2048, show_default=True, help="Paillier modulus size.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print only the JSON object (progress stays on stderr)."
)
def bench_device(iterations: int, key_bits: int, as_json: bool) -> None:
    """Peak RSS and CPU of one agent round without a key share vs plain local training (Fig. 5), and the
    extra CPU of a key holder's partial decryption. Each measured part runs in a fresh process."""
    from bench.device import run_device_bench

    console = Console(stderr=True)
    try:
        result = run_device_bench(
            iterations, key_bits, progress=lambda msg: console.print(msg, highlight=False)
        )
    except DatasetError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"one device round: {iterations} iterations, {key_bits}-bit key")
    for col in ("", "BlockDeepNet agent", "plain training", "overhead"):
        table.add_column(col, justify="right")
    table.add_row(
        "peak RSS",
        f"{result['peak_rss_mb']:.1f} MB",
        f"{result['baseline_peak_rss_mb']:.1f} MB",
        f"{result['mem_overhead']:+.1%}",
    )
    table.add_row(
        "CPU time",
        f"{result['cpu_s']:.1f} s",
        f"{result['baseline_cpu_s']:.1f} s",
        f"{result['cpu_overhead']:+.1%}",
    )
    table.add_row("key holder's duty", f"+{result['key_holder_extra_cpu_s']:.1f} s CPU", "", "")
    Console().print(table)


@cli.group()
def audit() -> None:
    """Check what the gateway committed on chain against public material only."""


@audit.command("round")
@click.argument("round_no", metavar="N", type=int)
@click.option("--rpc", required=True, help="JSON-RPC URL of a chain node.")
@click.option("--contract", "contract", required=True, help="Address of the BlockDeepNet contract.")
@click.option(
    "--public-key",
    "public_key_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The fleet's Paillier public key (JSON; a threshold public key file works too).",
)
@click.option(
    "--archive",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Folder of archived update payloads, one file per update named <payload hash hex>.bin.",
)
@click.option("--poa", is_flag=True, help="Besu / GoQuorum QBFT node (PoA extraData).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def audit_round_cmd(
    round_no: int, rpc: str, contract: str, public_key_file: str, archive: str, poa: bool, as_json: bool
) -> None:
    """Recompute round N's aggregate and Merkle root and say whether the committed global block is honest.

    Exit status: 0 honest, 1 not honest, 2 bad input or unreachable chain.
    """
    from pathlib import Path

    from blockdeepnet.audit import audit_round, chain_record
    from blockdeepnet.crypto.paillier import PublicKey
    from blockdeepnet.ledger import Ledger, LedgerError, new_gateway_account, rpc_web3

    try:
        key_data = json.loads(Path(public_key_file).read_text())
        pub = PublicKey.from_dict(key_data.get("public_key", key_data))
        ledger = Ledger(rpc_web3(rpc, poa=poa), contract, new_gateway_account())
        record = chain_record(ledger, round_no)
    except (ValueError, OSError, LedgerError) as exc:
        fail(str(exc))
    if record is None:
        fail(f"round {round_no} has no committed global block on chain")
    payloads = {}
    for f in Path(archive).glob("*.bin"):
        try:
            payloads[bytes.fromhex(f.stem.removeprefix("0x"))] = f.read_bytes()
        except ValueError:
            continue
    block, recorded = record
    report = audit_round(pub, block, recorded, payloads)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "round": round_no,
                    "honest": report.honest,
                    "updates": report.checked_updates,
                    "problems": report.problems,
                }
            )
        )
    else:
        verdict = "honest" if report.honest else "NOT honest"
        click.echo(f"round {round_no}: {verdict} ({report.checked_updates} of {block.count} updates checked)")
        for problem in report.problems:
            click.echo(f"  - {problem}")
    sys.exit(0 if report.honest else 1)


cli.add_command(chain)
cli.add_command(gateway)
cli.add_command(agent)
cli.add_command(provision)


@cli.command()
@click.option("--devices", default=10, show_default=True, help="Simulated devices (agent processes).")
@click.option("--rounds", default=5, show_default=True, help="Federated rounds.")
@click.option("--threshold", default=2, show_default=True, help="t: key holders needed to decrypt.")
@click.option("--holders", default=3, show_default=True, help="l: devices holding a key share.")
@click.option("--key-bits", default=2048, show_default=True, help="Paillier modulus size.")
@click.option("--seed", default=7, show_default=True, help="Data split, initial model and batches.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Folder for the fleet, logs, results.json and the PNG plots (a new run-<time> folder each time).",
)
@click.option(
    "--bench/--no-bench",
    default=True,
    show_default=True,
    help="Also measure round latency for 5-50 devices (the Fig. 4a plot; about 2 minutes).",
)
@click.option(
    "--http-port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port of the gateway's HTTP endpoint (dashboard, /metrics, /rpc); 0 = a free one.",
)
@click.option(
    "--upstream",
    metavar="HOST:PORT",
    default="",
    help="A plant MQTT broker to bridge to (gateway state, round and device states go up); "
    "the Sparkplug B edge node then publishes there too.",
)
@click.option(
    "--upstream-protocol",
    type=click.Choice(["3.1.1", "5"]),
    default="3.1.1",
    show_default=True,
    help="MQTT version spoken to the plant broker.",
)
@click.option(
    "--upstream-prefix",
    default="",
    help="Text put in front of every bridged topic on the plant broker (e.g. 'site1/').",
)
@click.option(
    "--sparkplug/--no-sparkplug",
    default=True,
    show_default=True,
    help="Run the Sparkplug B edge node (spBv1.0/BlockDeepNet/.../demo) on the plant broker, or on the "
    "embedded one without --upstream.",
)
def demo(
    devices: int,
    rounds: int,
    threshold: int,
    holders: int,
    key_bits: int,
    seed: int,
    out: Path,
    bench: bool,
    http_port: int,
    upstream: str,
    upstream_protocol: str,
    upstream_prefix: str,
    sparkplug: bool,
) -> None:
    """The appliance end to end on this machine: embedded broker + embedded chain + gateway + DEVICES device
    agents on the paper split of Fashion-MNIST, then a results table and PNG plots.

    Partial decryption dominates the time (about 55 s per primary key holder per round at 2048 bits), so the
    defaults (t = 2 of l = 3, 5 rounds) keep the whole demo under 15 minutes on 2 cores.
    """
    from blockdeepnet.data import load_fashion_mnist
    from cli.demo import Scada, expected_minutes, parse_upstream, result_table, run_demo

    if not 1 <= threshold <= holders <= devices or devices < 2 or rounds < 1:
        fail("need 2 <= devices, 1 <= threshold <= holders <= devices and rounds >= 1")
    try:
        plant = parse_upstream(upstream) if upstream else None
    except ValueError as exc:
        fail(f"--upstream: {exc}")
    scada = Scada(http_port, plant, upstream_protocol, upstream_prefix, sparkplug)
    try:
        load_fashion_mnist()
    except DatasetError as exc:
        fail(str(exc))
    console = Console()
    console.print(
        f"[bold]bdn demo[/]: {devices} devices, {rounds} rounds, t={threshold} of l={holders}, {key_bits}-bit key"
        f" - expect about {expected_minutes(devices, rounds, threshold, bench):.0f} min on 2 cores"
    )
    result = run_demo(
        out,
        devices=devices,
        rounds=rounds,
        threshold=threshold,
        holders=holders,
        key_bits=key_bits,
        seed=seed,
        bench=bench,
        console=console,
        scada=scada,
    )
    console.print(result_table(result))
    console.print(
        f"each device alone: {result['local_accuracy_mean']:.2%} on average; final model: round "
        f"{result['final_round']} (lowest global loss)"
    )
    console.print(
        f"results.json and plots in {result['output']}: " + ", ".join(Path(p).name for p in result["plots"])
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
