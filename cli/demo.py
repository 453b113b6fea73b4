"""`bdn demo`: the whole appliance on one machine, the paper's experiment end to end.

What runs: a fresh fleet folder (2048-bit threshold key dealt to ``holders`` devices, device keys, broker
credentials and ACL), the gateway in this process with its embedded amqtt broker (on a free port) and its
embedded chain, and ``devices`` device agents as separate ``bdn agent run`` processes (one BLAS thread each),
each training on its shard of the paper split of Fashion-MNIST. The display follows the round from the
gateway's events and from a read-only ``monitor`` MQTT client (which also counts the bytes on the wire).

Afterwards: each device trained alone for the same epochs (the local-only baseline), the gateway's round
benchmark for 5-50 publishers on the embedded broker (paper Fig. 4a), and the outputs: a table, ``results.json``
and PNG plots in the output folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.live import Live
from rich.table import Table

from blockdeepnet.config import load_gateway_config
from blockdeepnet.crypto.codec import SlotLayout
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.fleet import Fleet
from blockdeepnet.learning.model import PAPER_CNN_PARAMS
from blockdeepnet.wire import ONLINE_STATES, TopicKind, Topics, WireError
from gateway.broker import free_port
from gateway.service import Gateway
from provisioning.localfleet import LocalFleet, create_local_fleet

FLEET_NAME = "demo"


@dataclass(frozen=True)
class Scada:
    """How the demo's gateway shows up in a plant: its HTTP port (dashboard), an optional plant broker to bridge
    to, and whether the Sparkplug B edge node runs."""

    http_port: int = 0
    upstream: tuple[str, int] | None = None
    protocol: str = "3.1.1"
    prefix: str = ""
    sparkplug: bool = True

    def gateway_sections(self) -> dict[str, Any]:
        sections: dict[str, Any] = {"sparkplug": {"enabled": self.sparkplug}}
        if self.upstream is not None:
            host, port = self.upstream
            sections["bridge"] = {
                "enabled": True,
                "host": host,
                "port": port,
                "protocol": self.protocol,
                "remote_prefix": self.prefix,
                "client_id": f"bdn-bridge-{FLEET_NAME}-{secrets.token_hex(3)}",
            }
        return sections


def parse_upstream(text: str) -> tuple[str, int]:
    """``HOST:PORT`` of a plant broker, checked for reachability now: a typo should stop the demo at once, not
    show up as a bridge retrying in the background for ten minutes."""
    import socket

    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ValueError(f"cannot reach the plant broker at {host}:{port}: {exc.strerror or exc}") from exc
    return host, port


@dataclass
class RoundView:
    number: int
    phase: str = "training"
    accepted: int = 0
    recorded: int = 0
    rejected: int = 0
    shares: int = 0
    reports: dict[str, float | None] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    opened: float = field(default_factory=time.time)
    seconds: float | None = None
    close_latency_s: float | None = None
    gas: int = 0
    wire_bytes: int = 0
    devices: int = 0

    @property
    def accuracy(self) -> float | None:
        accs = [a for a in self.reports.values() if a is not None]
        return sum(accs) / len(accs) if accs else None


class DemoState:
    """Everything the live display shows; fed from the gateway's loop and the monitor's thread."""

    def __init__(self, devices: int, rounds: int) -> None:
        self.devices = devices
        self.rounds_wanted = rounds
        self.rounds: dict[int, RoundView] = {}
        self.states: dict[str, str] = {}
        self.lock = threading.Lock()
        self.current = 0
        self.all_reported = threading.Event()
        self.log: list[str] = []

    def round(self, r: int) -> RoundView:
        if r not in self.rounds:
            self.rounds[r] = RoundView(r)
        return self.rounds[r]

    def on_gateway(self, event: str, data: dict[str, Any]) -> None:
        with self.lock:
            r = data.get("round")
            if event == "round_open":
                self.current = data["round"]
                self.round(data["round"])
            elif event == "update_accepted" and r is not None:
                self.round(r).accepted += 1
            elif event == "update_recorded" and r is not None:
                rv = self.round(r)
                rv.recorded += 1
                rv.gas += data.get("gas") or 0
            elif event == "update_rejected":
                self.round(self.current).rejected += 1
                self.log.append(f"rejected {data.get('device')}: {data.get('reason')}")
            elif event == "round_closed" and r is not None:
                rv = self.round(r)
                rv.phase = "decrypting"
                rv.seconds = data["round_s"]
                rv.close_latency_s = data["close_latency_s"]
                rv.gas = data["update_gas"] + data["commit_gas"]
                rv.devices = data["count"]
                self._check_done(rv)
            elif event in ("round_skipped", "round_extended"):
                self.log.append(f"round {r}: {event.split('_')[1]} ({data.get('reason')})")
            elif event == "report" and r is not None:
                rv = self.round(r)
                rv.reports[data["device"]] = data["accuracy"]
                rv.losses[data["device"]] = data["loss"]
                self._check_done(rv)
            elif event == "device_state":
                self.states[data["device"]] = data["state"]

    def fill_reports(self, r: int, reports: list[tuple[str, float, float | None]]) -> None:
        """Reports read from the gateway's store (the fallback when an event went by unseen)."""
        with self.lock:
            rv = self.round(r)
            for device, loss, accuracy in reports:
                rv.reports[device], rv.losses[device] = accuracy, loss
            rv.devices = rv.devices or len(reports)
            self._check_done(rv)

    def _check_done(self, rv: RoundView) -> None:
        # Reports can overtake the gateway's own round_closed event (a fast decryption): check on both.
        if len(rv.reports) >= rv.devices > 0:
            rv.phase = "done"
            if rv.number >= self.rounds_wanted:
                self.all_reported.set()

    def on_wire(self, kind: TopicKind, round_no: int | None, size: int) -> None:
        with self.lock:
            r = round_no if round_no is not None else self.current
            if r:
                self.round(r).wire_bytes += size
                if kind == "share":
                    self.round(r).shares += 1

    def table(self) -> Table:
        t = Table(title=f"BlockDeepNet demo: {self.devices} devices, fleet '{FLEET_NAME}'", expand=False)
        for col in (
            "round",
            "phase",
            "updates",
            "shares",
            "reports",
            "global acc.",
            "latency",
            "wire",
            "gas",
        ):
            t.add_column(col, justify="right")
        with self.lock:
            for r in sorted(self.rounds):
                v = self.rounds[r]
                elapsed = v.seconds if v.seconds is not None else time.time() - v.opened
                t.add_row(
                    str(r),
                    v.phase,
                    f"{v.recorded}/{self.devices}",
                    str(v.shares),
                    f"{len(v.reports)}/{v.devices or self.devices}",
                    f"{v.accuracy:.2%}" if v.accuracy is not None else "-",
                    f"{elapsed:.0f} s",
                    f"{v.wire_bytes / 1e6:.1f} MB",
                    f"{v.gas:,}",
                )
            online = sum(1 for s in self.states.values() if s in ONLINE_STATES)
            t.caption = f"devices online: {online}/{self.devices}" + (
                f"  |  {self.log[-1]}" if self.log else ""
            )
        return t


class Monitor:
    """A read-only MQTT client (the ``monitor`` user of the ACL) that counts what crosses the broker."""

    def __init__(self, state: DemoState, port: int, password: str) -> None:
        self.topics = Topics(FLEET_NAME)
        self.state = state
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"demo-monitor-{secrets.token_hex(3)}"
        )
        self.client.username_pw_set("monitor", password)
        self.client.on_connect = lambda c, *_: c.subscribe(self.topics.prefix + "#", qos=0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            parsed = self.topics.parse(msg.topic)
        except WireError:
            return
        self.state.on_wire(parsed.kind, parsed.round, len(msg.payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def expected_minutes(devices: int, rounds: int, threshold: int, bench: bool) -> float:
    """On 2 x86 cores (README figures): per round ~2 s training per device, ~55 s per primary key holder's
    partial decryption (2,104 ciphertexts), ~3 s per device to verify and combine; then the baseline."""
    cores = os.cpu_count() or 2
    per_round = (devices * 2.5 + threshold * 55 + devices * 3) / min(cores, 2) + 10
    baseline = devices * rounds * 1.0 / min(cores, 2)
    return (30 + rounds * per_round + baseline + (30 if bench else 0)) / 60


def _agent_cmd(config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.main",
        "agent",
        "run",
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]


async def run_federation(local: LocalFleet, state: DemoState, console: Console, logs: Path) -> None:
    cfg = load_gateway_config(local.gateway_config)
    fleet = Fleet.load(local.root / "fleet.json")
    gw = Gateway(cfg, fleet, on_event=state.on_gateway)
    stop = asyncio.Event()
    gw_task = asyncio.create_task(gw.run(stop))
    ready = asyncio.create_task(gw.ready.wait())
    await asyncio.wait([gw_task, ready], return_when=asyncio.FIRST_COMPLETED)
    if gw_task.done():
        gw_task.result()
    assert gw.broker_port is not None
    monitor = Monitor(state, gw.broker_port, local.passwords["monitor"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for d in local.devices:
        with (logs / f"{d.name}.log").open("wb") as out:
            agents.append(
                subprocess.Popen(_agent_cmd(d.config), stdout=out, stderr=subprocess.STDOUT, env=env)
            )
        await asyncio.sleep(0.3)  # staggered, as real devices boot: no thundering herd on the broker
    try:
        with Live(state.table(), console=console, refresh_per_second=2) as live:
            while not state.all_reported.is_set():
                live.update(state.table())
                if gw_task.done():
                    gw_task.result()
                    raise RuntimeError("the gateway stopped before the last round was reported")
                dead = [d.name for d, a in zip(local.devices, agents, strict=True) if a.poll() is not None]
                if len(dead) == len(agents):
                    raise RuntimeError(f"every device agent exited; see {logs}")
                # The store is the record: if an event was missed, the last round's reports are still there.
                reports = await asyncio.to_thread(gw.store.reports, state.rounds_wanted)
                if len(reports) >= len(local.devices):
                    state.fill_reports(state.rounds_wanted, [(r.device, r.loss, r.accuracy) for r in reports])
                await asyncio.sleep(0.5)
            live.update(state.table())
    finally:
        for a in agents:
            if a.poll() is None:
                a.send_signal(signal.SIGTERM)
        for a in agents:
            try:
                # In a thread: the broker runs on this loop, and agents going offline still talk to it.
                await asyncio.to_thread(a.wait, 20)
            except subprocess.TimeoutExpired:
                a.kill()
        monitor.close()
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(gw_task, return_exceptions=True), 30)
        except TimeoutError:
            gw_task.cancel()


def write_plots(out: Path, result: dict[str, Any], bench: dict[str, Any] | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rounds = [r["round"] for r in result["rounds"]]
    final_global = result["rounds"][-1]["global_accuracy"]
    local = result["local_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(1, len(local) + 1)
    ax.bar([x - 0.2 for x in xs], [a * 100 for a in local], width=0.4, label="device alone (same epochs)")
    ax.bar(
        [x + 0.2 for x in xs], [final_global * 100] * len(local), width=0.4, label="BlockDeepNet global model"
    )
    ax.set_xlabel("device")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(min(a * 100 for a in local) - 5, 100)
    ax.set_title(f"Fig. 3: local vs global accuracy after {len(rounds)} rounds")
    ax.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    written.append(out / "fig3_local_vs_global.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, [r["global_accuracy"] * 100 for r in result["rounds"]], "o-", label="global model")
    ax.plot(rounds, [a * 100 for a in result["local_accuracy_curve"]], "s--", label="device alone (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per round")
    ax.legend()
    fig.tight_layout()
    written.append(out / "accuracy_per_round.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if bench is not None:
        section = bench.get("amqtt", bench)
        ns = sorted(int(n) for n in section["close_latency_s"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(ns, [section["round_wall_s"][str(n)] for n in ns], "o-", label="round (open to global block)")
        ax.plot(
            ns, [section["close_latency_s"][str(n)] for n in ns], "s-", label="closing (last update to block)"
        )
        ax.set_xlabel("devices")
        ax.set_ylabel("seconds")
        ax.set_title("Fig. 4a: gateway latency per round vs number of devices")
        ax.legend()
        fig.tight_layout()
        written.append(out / "fig4a_latency_vs_devices.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def summarize(state: DemoState, local_curves: Any) -> dict[str, Any]:
    rows = []
    for r in sorted(state.rounds):
        v = state.rounds[r]
        if v.seconds is None:
            continue
        samples = len(v.losses) or 1
        rows.append(
            {
                "round": r,
                "global_accuracy": v.accuracy,
                "global_loss": sum(v.losses.values()) / samples,
                "seconds": v.seconds,
                "close_latency_s": v.close_latency_s,
                "wire_bytes": v.wire_bytes,
                "gas": v.gas,
                "updates": v.devices,
            }
        )
    local_final = local_curves[:, -1].tolist()
    return {
        "devices": state.devices,
        "rounds": rows,
        "local_accuracy": local_final,
        "local_accuracy_mean": float(sum(local_final) / len(local_final)),
        "local_accuracy_curve": local_curves.mean(axis=0).tolist()[: len(rows)],
        "final_round": min(rows, key=lambda x: (x["global_loss"], x["round"]))["round"] if rows else None,
    }


def run_demo(
    out: Path,
    *,
    devices: int,
    rounds: int,
    threshold: int,
    holders: int,
    key_bits: int,
    seed: int,
    bench: bool,
    console: Console,
    scada: Scada | None = None,
) -> dict[str, Any]:
    from cli.simulation import SimulationConfig, local_only_curves

    run_dir = out / time.strftime("run-%Y%m%d-%H%M%S")
    started = time.time()
    console.print(
        f"dealing a {key_bits}-bit Paillier key to {holders} key-holder devices (t = {threshold})..."
    )
    dealt = deal(threshold, holders, key_bits, allow_insecure=key_bits < 2048)
    scada = scada or Scada()
    broker_port = free_port("127.0.0.1")
    http_port = scada.http_port or free_port("127.0.0.1")
    local = create_local_fleet(
        run_dir / "fleet",
        name=FLEET_NAME,
        devices=devices,
        threshold=threshold,
        holders=holders,
        broker_port=broker_port,
        http_port=http_port,
        model_seed=seed,
        dealt=dealt,
        gateway_extra={
            "rounds": {"max_rounds": rounds, "min_updates": 2, "deadline_s": 900.0},
            **scada.gateway_sections(),
        },
        agent_extra=lambda _k: {
            "chain_rpc": f"http://127.0.0.1:{http_port}/rpc",
            "data": {"evaluate_test": True},
        },
    )
    console.print(
        f"fleet in {local.root}: embedded broker on 127.0.0.1:{broker_port}, embedded chain "
        f"(read-only RPC at http://127.0.0.1:{http_port}/rpc), metrics at http://127.0.0.1:{http_port}/metrics"
    )
    console.print(f"dashboard: http://127.0.0.1:{http_port}/dashboard")
    if scada.upstream is not None:
        host, port = scada.upstream
        console.print(
            f"bridged to the plant broker at {host}:{port} (MQTT {scada.protocol}, prefix {scada.prefix!r})"
            + ("; Sparkplug B edge node there" if scada.sparkplug else "")
        )
    state = DemoState(devices, rounds)
    asyncio.run(run_federation(local, state, console, run_dir / "logs"))
    console.print(
        f"federation done in {time.time() - started:.0f} s; training each device alone for comparison..."
    )
    sim = SimulationConfig(devices=devices, rounds=rounds, encrypted=False, seed=seed)
    result = summarize(state, local_only_curves(sim, rounds))
    bench_result = None
    if bench:
        from bench.round import run_round_bench

        console.print(
            "measuring the gateway's round latency for 5, 10, 20 and 50 devices (embedded broker)..."
        )
        bench_result = run_round_bench(
            brokers=("amqtt",), dealt=dealt, progress=lambda m: console.print(f"  {m}")
        )
        result["round_bench"] = bench_result
    layout = SlotLayout(key_bits)
    result.update(
        key_bits=key_bits,
        threshold=threshold,
        holders=holders,
        ciphertexts_per_update=layout.ciphertexts_for(PAPER_CNN_PARAMS),
        seconds=time.time() - started,
        output=str(run_dir),
    )
    (run_dir / "results.json").write_text(json.dumps(result, indent=1))
    result["plots"] = [str(p) for p in write_plots(run_dir, result, bench_result)]
    return result


def result_table(result: dict[str, Any]) -> Table:
    t = Table(title="BlockDeepNet demo: results")
    for col in (
        "round",
        "global accuracy",
        "mean local-only accuracy",
        "round latency",
        "bytes on the wire",
        "gas",
    ):
        t.add_column(col, justify="right")
    for row, alone in zip(result["rounds"], result["local_accuracy_curve"], strict=False):
        acc = row["global_accuracy"]
        t.add_row(
            str(row["round"]),
            f"{acc:.2%}" if acc is not None else "-",
            f"{alone:.2%}",
            f"{row['seconds']:.1f} s",
            f"{row['wire_bytes']:,}",
            f"{row['gas']:,}",
        )
    return t


__all__ = ["expected_minutes", "result_table", "run_demo"]
