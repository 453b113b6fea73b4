"""`bdn bench device`: what the BlockDeepNet layer costs one device per round (the paper's Fig. 5), in one run.

Three kinds of process, each started fresh (``python -m bench.device ROLE ...``, one BLAS/OpenMP thread), so
that the peak resident set (see :func:`usage`) and ``ru_utime + ru_stime`` are that process's own:

- **layer**: the measured device, a real :class:`firmware_agent.agent.Agent` built from its ``agent.toml``
  (``bdn agent run``'s path) for a device that holds no key share. It runs one whole round against a real small
  fleet on this machine: the gateway (embedded amqtt broker, embedded chain, its read-only ``/rpc`` for the
  devices' chain checks) in the bench's own process, and two key-holder agents (t = 2 of l = 2) as processes of
  their own. The device trains ``iterations`` local minibatch steps, encrypts, signs and publishes its update,
  waits for its receipt, then obtains the global block, checks it against the chain commit, verifies both
  holders' shares, combines them, applies the mean update and reports its loss. It runs two rounds; ``cpu_s``
  is the CPU between "round 1 applied" and "round 2 applied": one round of a running daemon, with exactly one
  randomness-pool refill, one training, one update and one global model (round 1 also pays the interpreter
  start, imports, keys and the first pool fill: ``first_round_cpu_s``). ``peak_rss_mb`` is the process's peak
  over both rounds, start-up included.
- **baseline**: the same device without BlockDeepNet: the same shard (from the same file), the same initial
  model, the same rule, hyperparameters, minibatch order and number of iterations, computing the same clipped
  update (:func:`plain_training` is ``Trainer.train`` without the agent around it, and a test holds the two
  equal), and nothing else: no encryption, signing, chain client or MQTT. ``baseline_cpu_s`` is its CPU from
  the start of training to the end (its interpreter start and data load, like the daemon's, are not per round). This module imports none of that at
  its top (the layer code is imported inside the functions that need it), and the baseline lists any of
  those modules it finds loaded in ``baseline_layer_modules`` (empty when the comparison is fair). The baseline
  cannot use ``firmware_agent.trainer`` itself: importing any ``firmware_agent`` module runs the package's
  ``__init__``, which imports the agent and with it web3, gmpy2 and paho (~60 MB, ~1.4 s CPU).
  ``train_loss`` (the mean minibatch loss, from the agent's ``trained`` event) equals ``baseline_train_loss``
  when both trained on the same samples in the same order from the same model.
- **key holders**: ``key_holder_extra_cpu_s`` is the CPU time of a holder agent's worker thread from its
  chain check of the global block to its share being published: the partial decryption of the round's real
  aggregate, its proof and the share message (a device without a share does none of it; a holder instead
  verifies one share fewer). Thread CPU, so the MQTT thread and the randomness-pool refill running at the
  same time are not counted; the mean over both holders (each is in ``key_holder_extra_cpu_s_each``).

Both measured devices load their shard (2,745 Fashion-MNIST images of the paper split, shard 2 of 3) from an
``.npz`` file, as a real device holds only its own data: the ``fashion-mnist-shard`` source of ``agent.toml``
cuts the shard out of the whole 60,000-image set in float32 (~320 MB peak), a simulation convenience that
would hide the figure this bench is for. The key holders train one iteration only (their training is not
measured and would only compete for the two cores). ``startup_cpu_s`` / ``baseline_startup_cpu_s`` are each
process's CPU before training starts (for the agent: imports, keys, data, the fixed-base randomness table),
the part a long-running daemon pays once rather than per round. ``cpu_s_by_stage`` / ``peak_rss_mb_by_stage``
are the process's CPU time and peak so far when the agent started, when the round opened (training starts),
when its update was out and when it had applied the round (``cpu_s``, ``peak_rss_mb``); ``train_cpu_s`` is the
agent's worker-thread CPU from the start of training to the update being published (training, encryption,
signing), ``baseline_train_cpu_s`` the baseline's for training alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from blockdeepnet.config import TrainConfig
from blockdeepnet.learning import PAPER_CNN_PARAMS, FedAvgSGD, LocalResult, VarianceReduced

if TYPE_CHECKING:
    from provisioning.localfleet import LocalFleet

Progress = Callable[[str], None]

DEFAULT_ITERATIONS = 1500
"""The paper's local work per round (1,500 local iterations)."""

THRESHOLD, HOLDERS, DEVICES = 2, 2, 3
MEASURED = 2
"""Index of the measured device in the fleet: devices 0..HOLDERS-1 hold key shares, this one does not."""

ROUND = 1  # the round the baseline replays (its model and minibatch order)
MEASURED_ROUND = 2  # the steady-state round: from "round 1 applied" to "round 2 applied"
LAYER_MODULES = (
    "web3",
    "eth_account",
    "eth_tester",
    "gmpy2",
    "paho",
    "amqtt",
    "cbor2",
    "blockdeepnet.crypto",
    "blockdeepnet.eip712",
    "firmware_agent",
    "gateway",
)
"""Top-level modules of the BlockDeepNet layer: the baseline must load none of them."""

_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_HOLDER_ITERATIONS = 1
_FAILURE_EVENTS = (
    "error",
    "round_refused",
    "global_refused",
    "overflow",
    "publish_gave_up",
    "connect_failed",
)


# ------------------------------------------------------------------------------------ shared with the children


def usage() -> tuple[float, float]:
    """This process's own peak resident set so far (MB) and CPU time (user + system, s), all threads.

    The peak is ``VmHWM`` of ``/proc/self/status`` where there is one, not ``ru_maxrss``: Linux carries the
    high-water mark of the address space a process replaces at ``execve`` into its ``ru_maxrss``, so every
    child of this bench (which holds the dataset and the whole stack) would report at least the bench's own
    size (measured: a bare ``python -c`` child of a parent holding a 300 MB array reports ru_maxrss 326 MB,
    VmHWM 11 MB).
    ``VmHWM`` belongs to the new address space only."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0, cpu
    except OSError:
        pass
    return ru.ru_maxrss / 1024.0, cpu


def plain_training(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32],
    train: TrainConfig,
    *,
    seed: int,
    stream: int,
    round_no: int,
    clip: float,
) -> tuple[npt.NDArray[np.float32], LocalResult]:
    """The clipped update ``firmware_agent.trainer.Trainer.train`` computes, without the agent: same rule
    choice, hyperparameters and minibatch stream ``[seed, round, shard]``."""
    rule_cls = FedAvgSGD if train.rule == "fedavg" else VarianceReduced
    rule = rule_cls(
        lr=train.lr,
        batch_size=train.batch_size,
        epochs=train.local_epochs,
        iterations=train.local_iterations or None,
    )
    result = rule.run(weights, x, y, np.random.default_rng([seed, round_no, stream]))
    return np.clip(result.weights - weights, -clip, clip).astype(np.float32), result


def _images_as_the_agent_loads_them(raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """uint8 (N, 28, 28) to float32 (N, 1, 28, 28) in [0, 1], the conversion of the agent's npz loader."""
    return (raw[:, None, :, :].astype(np.float32) / np.float32(255.0)).astype(np.float32)


# --------------------------------------------------------------------------------------------- the children


def _baseline_child(spec_file: str) -> dict[str, Any]:
    """Plain local training, nothing else; ``spec_file`` names the shard, the initial model and the config."""
    spec = json.loads(Path(spec_file).read_text())
    with np.load(spec["data"], allow_pickle=False) as npz:
        x = _images_as_the_agent_loads_them(npz["x"])
        y = npz["y"].astype(np.int64)
    weights = np.load(spec["weights"], allow_pickle=False)
    startup_rss, startup_cpu = usage()
    start, start_cpu = time.perf_counter(), time.thread_time()
    _, result = plain_training(
        x,
        y,
        weights,
        TrainConfig(**spec["train"]),
        seed=spec["seed"],
        stream=spec["stream"],
        round_no=spec["round"],
        clip=spec["clip"],
    )
    wall, train_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    peak, cpu = usage()
    return {
        "peak_rss_mb": peak,
        "cpu_s": cpu,
        "startup_cpu_s": startup_cpu,
        "startup_rss_mb": startup_rss,
        "train_wall_s": wall,
        "train_cpu_s": train_cpu,
        "train_loss": float(result.train_loss),
        "steps": result.steps,
        "samples": result.samples,
        "layer_modules": sorted(
            m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in LAYER_MODULES)
        ),
    }


def _layer_child(config: str) -> dict[str, Any]:
    """The measured device: the real agent from ``config`` until it has applied round 1, then its usage."""
    from firmware_agent.service import build_agent, run_forever

    out: dict[str, Any] = {}

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "started":
            out["startup_rss_mb"], out["startup_cpu_s"] = usage()
        elif name == "training" and data["round"] == MEASURED_ROUND:
            out["training_cpu_s"] = usage()[1]
            out["train_thread_cpu_s"] = time.thread_time()
        elif name == "trained" and data["round"] == ROUND:
            out.update(train_loss=data["train_loss"], samples=data["samples"])
        elif name == "trained" and data["round"] == MEASURED_ROUND:
            out["train_wall_s"] = data["seconds"]
            out["trained_rss_mb"], out["trained_cpu_s"] = usage()
            out["train_thread_cpu_s"] = time.thread_time() - out["train_thread_cpu_s"]
        elif name == "update_published":
            out.update(ciphertexts=data["ciphertexts"], update_bytes=data["bytes"])
        elif name == "receipt" and not data["accepted"]:
            out["error"] = f"update refused by the gateway: {data['reason']} {data['detail']}"
            device.stop()
        elif name == "applied" and data["round"] == ROUND:
            out["round1_rss_mb"], out["round1_cpu_s"] = usage()
        elif name == "applied" and data["round"] >= MEASURED_ROUND:
            out["peak_rss_mb"], out["cpu_s"] = usage()
            device.stop()
        elif name in _FAILURE_EVENTS:
            out["error"] = f"{name}: {data}"
            device.stop()

    device = build_agent(Path(config), on_event=on_event)
    run_forever(device)
    if "cpu_s" not in out and "error" not in out:
        out["error"] = f"stopped before applying round {MEASURED_ROUND}"
    return out


def _holder_child(config: str) -> dict[str, Any]:
    """A key holder until SIGTERM: the CPU its worker thread spends from the chain check to its share."""
    from firmware_agent.service import build_agent, run_forever

    out: dict[str, Any] = {}
    checked: dict[int, tuple[int, float]] = {}

    def on_event(name: str, data: dict[str, Any]) -> None:
        if name == "global_checked":
            checked[data["round"]] = (threading.get_ident(), time.thread_time())
        elif name == "share_published" and data["round"] in checked:
            thread, cpu = checked.pop(data["round"])
            if thread != threading.get_ident():
                out["error"] = "the chain check and the share duty ran on different threads"
                return
            out.update(duty_cpu_s=time.thread_time() - cpu, duty_wall_s=data["seconds"], role=data["role"])
        elif name in _FAILURE_EVENTS:
            out["error"] = f"{name}: {data}"

    run_forever(build_agent(Path(config), on_event=on_event))
    return out


_ROLES: dict[str, Callable[[str], dict[str, Any]]] = {
    "baseline": _baseline_child,
    "layer": _layer_child,
    "holder": _holder_child,
}


def child_main(argv: list[str]) -> int:
    """``python -m bench.device ROLE ARG``: run one measured process; its result is the last stdout line."""
    if len(argv) != 2 or argv[0] not in _ROLES:
        print(f"usage: python -m bench.device {{{'|'.join(_ROLES)}}} ARG", file=sys.stderr)
        return 2
    result = _ROLES[argv[0]](argv[1])
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 1 if "error" in result else 0


# ------------------------------------------------------------------------------------------------ the parent


def _child_command(role: str, arg: Path) -> list[str]:
    return [sys.executable, "-m", "bench.device", role, str(arg)]


def _child_env() -> dict[str, str]:
    """One BLAS thread, and this checkout's packages first (the children must run the code that is measured)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, **_CHILD_ENV, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _child_result(role: str, out: Path, log: Path) -> dict[str, Any]:
    """The JSON a child printed last; a child that failed or printed nothing is an error naming its log."""
    lines = out.read_text().strip().splitlines() if out.exists() else []
    result: dict[str, Any] | None = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if result is None or "error" in result:
        why = result["error"] if result else "no result"
        raise RuntimeError(f"{role} process failed ({why}); its log ends:\n{_tail(log)}")
    return result


def _write_shards(local: LocalFleet) -> None:
    """Each device's shard of the paper split as ``shard.npz`` (uint8) in its folder: the data a device holds."""
    from blockdeepnet.data import load_fashion_mnist
    from firmware_agent.trainer import shard_of

    data = load_fashion_mnist()
    for k, device in enumerate(local.devices):
        idx = shard_of(len(data.train_y), k, DEVICES, local.fleet.model_seed)
        pixels = np.rint(data.train_x[idx, 0] * np.float32(255.0)).astype(np.uint8)
        if not np.array_equal(_images_as_the_agent_loads_them(pixels), data.train_x[idx]):
            raise RuntimeError("the shard does not survive the round trip through uint8")
        np.savez(device.folder / "shard.npz", x=pixels, y=data.train_y[idx])


def _make_fleet(root: Path, key_bits: int, iterations: int, say: Progress) -> LocalFleet:
    """A 3-device fleet: two key holders and the measured device without a share, each with its shard."""
    from blockdeepnet.crypto.threshold import deal
    from gateway.broker import free_port
    from provisioning.localfleet import create_local_fleet

    say(f"dealing a {key_bits}-bit threshold key (t = {THRESHOLD} of l = {HOLDERS})")
    dealt = deal(THRESHOLD, HOLDERS, key_bits, allow_insecure=key_bits < 2048)
    broker_port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")

    def agent_extra(k: int) -> dict[str, Any]:
        return {
            "chain_rpc": f"http://127.0.0.1:{http_port}/rpc",
            "data": {"source": "npz", "path": "shard.npz"},
            "train": {"local_iterations": iterations if k == MEASURED else _HOLDER_ITERATIONS},
        }

    local = create_local_fleet(
        root / "fleet",
        name="benchdevice",
        devices=DEVICES,
        threshold=THRESHOLD,
        holders=HOLDERS,
        broker_port=broker_port,
        http_port=http_port,
        dealt=dealt,
        # Every device's update is awaited (none is "offline and not waited for" while it still starts up).
        gateway_extra={
            "rounds": {
                "max_rounds": MEASURED_ROUND,
                "quorum": DEVICES,
                "min_updates": DEVICES,
                "deadline_s": 3600.0,
            }
        },
        agent_extra=agent_extra,
    )
    say("writing each device's shard of the paper split")
    _write_shards(local)
    return local


def _run_baseline(local: LocalFleet, iterations: int, work: Path, timeout: float) -> dict[str, Any]:
    from blockdeepnet.config import load_agent_config

    device = local.devices[MEASURED]
    cfg = load_agent_config(device.config)
    np.save(work / "initial.npy", local.fleet.initial_model())
    spec = {
        "data": str(cfg.data.path),
        "weights": str(work / "initial.npy"),
        "train": {
            "rule": cfg.train.rule,
            "lr": cfg.train.lr,
            "batch_size": cfg.train.batch_size,
            "local_epochs": cfg.train.local_epochs,
            "local_iterations": iterations,
        },
        "seed": cfg.data.seed,
        "stream": cfg.data.shard,
        "round": ROUND,
        "clip": local.fleet.layout.clip,
    }
    (work / "baseline.json").write_text(json.dumps(spec))
    out, log = work / "baseline.out", work / "baseline.log"
    start = time.perf_counter()
    with out.open("wb") as stdout, log.open("wb") as stderr:
        subprocess.run(
            _child_command("baseline", work / "baseline.json"),
            stdout=stdout,
            stderr=stderr,
            env=_child_env(),
            timeout=timeout,
            check=False,
        )
    result = _child_result("baseline", out, log)
    result["wall_s"] = time.perf_counter() - start
    return result


async def _layer_round(
    local: LocalFleet, work: Path, timeout: float, say: Progress
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One real round: the gateway here, the key holders and the measured device as processes."""
    import asyncio

    from blockdeepnet.config import load_gateway_config
    from blockdeepnet.fleet import Fleet
    from gateway.service import Gateway

    names = {d.address: d.name for d in local.devices}

    def on_gateway(event: str, data: dict[str, Any]) -> None:
        if event == "update_recorded":
            say(f"  update of {names.get(data['device'], data['device'])} recorded on chain")
        elif event == "round_closed":
            say("  round closed, global block out: the key holders decrypt, the devices combine")
        elif event in ("round_skipped", "round_extended"):
            say(f"  gateway: {event} ({data.get('reason')})")

    cfg = load_gateway_config(local.gateway_config)
    gw = Gateway(cfg, Fleet.load(local.root / "fleet.json"), on_event=on_gateway)
    stop = asyncio.Event()
    gw_task = asyncio.create_task(gw.run(stop))
    await asyncio.wait([gw_task, asyncio.create_task(gw.ready.wait())], return_when=asyncio.FIRST_COMPLETED)
    if gw_task.done():
        gw_task.result()

    procs: dict[str, asyncio.subprocess.Process] = {}
    files: dict[str, tuple[Path, Path]] = {}

    async def spawn(key: str, role: str, config: Path) -> asyncio.subprocess.Process:
        out, log = work / f"{key}.out", work / f"{key}.log"
        files[key] = (out, log)
        with out.open("wb") as stdout, log.open("wb") as stderr:
            procs[key] = await asyncio.create_subprocess_exec(
                *_child_command(role, config), stdout=stdout, stderr=stderr, env=_child_env()
            )
        return procs[key]

    holder_keys = [f"holder-{d.name}" for d in local.devices if d.key_share]
    try:
        start = time.perf_counter()
        measured = await spawn("layer", "layer", local.devices[MEASURED].config)
        for key, d in zip(holder_keys, (d for d in local.devices if d.key_share), strict=True):
            await spawn(key, "holder", d.config)
        say("  gateway up; the measured device and the key holders started")
        done = asyncio.create_task(measured.wait())
        deadline = time.monotonic() + timeout
        while not done.done():
            await asyncio.wait([done, gw_task], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if gw_task.done():
                gw_task.result()
                raise RuntimeError("the gateway stopped before the round was applied")
            for key in holder_keys:
                if procs[key].returncode is not None:
                    raise RuntimeError(f"{key} exited early; its log ends:\n{_tail(files[key][1])}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no applied round within {timeout:.0f} s; log:\n{_tail(files['layer'][1])}"
                )
        wall = time.perf_counter() - start
        layer = _child_result("device agent", *files["layer"])
        layer["wall_s"] = wall
        for key in holder_keys:
            procs[key].terminate()
        for key in holder_keys:
            await asyncio.wait_for(procs[key].wait(), 60)
        holders = [_child_result(key, *files[key]) for key in holder_keys]
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(gw_task, return_exceptions=True), 30)
        except TimeoutError:
            gw_task.cancel()
    return layer, holders


def run_device_bench(
    iterations: int = DEFAULT_ITERATIONS, key_bits: int = 2048, progress: Progress | None = None
) -> dict[str, Any]:
    """Measure the layer round, the plain-training baseline and the key holders' duty; one JSON-ready dict."""
    import asyncio

    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    say = progress or (lambda _m: None)
    # Generous: a slow board trains ~10x slower than a laptop core, and a 2048-bit partial decryption takes
    # ~40 s here.
    timeout = 900.0 + 0.2 * iterations
    with tempfile.TemporaryDirectory(prefix="bdn-bench-device-") as tmp:
        work = Path(tmp)
        local = _make_fleet(work, key_bits, iterations, say)
        say(f"baseline: plain local training, {iterations} iterations, in a fresh process")
        baseline = _run_baseline(local, iterations, work, timeout)
        say(f"layer: one round of the real agent ({iterations} iterations) with gateway and 2 key holders")
        layer, holders = asyncio.run(_layer_round(local, work, timeout, say))
    duty = [h["duty_cpu_s"] for h in holders]
    round_cpu = layer["cpu_s"] - layer["round1_cpu_s"]
    baseline_cpu = baseline["cpu_s"] - baseline["startup_cpu_s"]
    return {
        "peak_rss_mb": layer["peak_rss_mb"],
        "baseline_peak_rss_mb": baseline["peak_rss_mb"],
        "cpu_s": round_cpu,
        "baseline_cpu_s": baseline_cpu,
        "cpu_overhead": round_cpu / baseline_cpu - 1.0,
        "mem_overhead": layer["peak_rss_mb"] / baseline["peak_rss_mb"] - 1.0,
        "key_holder_extra_cpu_s": sum(duty) / len(duty),
        "key_holder_extra_cpu_s_each": duty,
        "key_holder_duty_wall_s": [h["duty_wall_s"] for h in holders],
        "first_round_cpu_s": layer["round1_cpu_s"],
        "first_round_peak_rss_mb": layer["round1_rss_mb"],
        "startup_cpu_s": layer["startup_cpu_s"],
        "baseline_startup_cpu_s": baseline["startup_cpu_s"],
        "train_cpu_s": layer["train_thread_cpu_s"],
        "baseline_train_cpu_s": baseline["train_cpu_s"],
        "cpu_s_by_stage": {
            "started": layer["startup_cpu_s"],
            "round_1_applied": layer["round1_cpu_s"],
            "round_2_open": layer["training_cpu_s"],
            "trained_and_published": layer["trained_cpu_s"],
            "applied": layer["cpu_s"],
            "baseline_before_training": baseline["startup_cpu_s"],
        },
        "peak_rss_mb_by_stage": {
            "started": layer["startup_rss_mb"],
            "trained_and_published": layer["trained_rss_mb"],
            "applied": layer["peak_rss_mb"],
            "baseline_before_training": baseline["startup_rss_mb"],
        },
        "train_loss": layer["train_loss"],
        "baseline_train_loss": baseline["train_loss"],
        "baseline_layer_modules": baseline["layer_modules"],
        "key_bits": key_bits,
        "threshold": THRESHOLD,
        "holders": HOLDERS,
        "iterations": iterations,
        "params": PAPER_CNN_PARAMS,
        "ciphertexts": layer["ciphertexts"],
        "update_bytes": layer["update_bytes"],
        "samples": layer["samples"],
        "chain": "embedded",
        "broker": "amqtt",
        "wall_s": {
            "round": layer["wall_s"],
            "train": layer["train_wall_s"],
            "baseline": baseline["wall_s"],
            "baseline_train": baseline["train_wall_s"],
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


__all__ = ["DEFAULT_ITERATIONS", "LAYER_MODULES", "child_main", "plain_training", "run_device_bench", "usage"]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
