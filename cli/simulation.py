"""Federated training on one machine: devices as worker processes, optional real threshold encryption.

Each round: every device trains from the global weights on its shard (one BLAS thread per process),
computes its update delta_k = w_k - w^{p-1}, and (``encrypted``) quantizes it with its Eq. 4 weight
s_k / s, encrypts it under the fleet key and hands over only ciphertexts. The "gateway" folds the ciphertexts
into an encrypted sum, t key holders (also worker processes) publish verified partial decryptions, and the sum
is combined and decoded into the weighted mean update. ``plaintext`` does the same Eq. 4 in the clear.

Updates are clipped to the codec's range before either path, identically, so the two modes differ only by
the codec's quantization (its error bound is reported).

Per round, ``global_loss`` is the new global model's loss on the union of the devices' training shards (the
quantity the lowest-loss rule picks the final model by) and ``global_accuracy`` its test-set accuracy.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blockdeepnet.crypto.codec import SlotLayout, sample_weight
from blockdeepnet.crypto.homomorphic import Accumulator
from blockdeepnet.crypto.randomness import FixedBaseTable, OnTheSpot
from blockdeepnet.crypto.threshold import KeyShare, PartialDecryption, ThresholdPublicKey, combine, deal
from blockdeepnet.crypto.vector import decode_aggregate, encrypt_update
from blockdeepnet.data import (
    PAPER_DEVICES,
    PAPER_SAMPLES_PER_DEVICE,
    load_fashion_mnist,
    partition_iid,
    partition_non_iid,
)
from blockdeepnet.learning import (
    BestRound,
    FedAvgSGD,
    VarianceReduced,
    evaluate,
    flatten,
    init_params,
    unflatten,
)
from blockdeepnet.learning.aggregation import converged

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class SimulationConfig:
    devices: int = PAPER_DEVICES
    rounds: int = 3
    non_iid: int | None = None
    encrypted: bool = True
    seed: int = 7
    rule: str = "fedavg"
    lr: float = 0.2
    batch_size: int = 32
    local_epochs: int = 1
    samples_per_device: int | None = None
    key_bits: int = 2048
    threshold: int = 2
    holders: int = 3
    value_bits: int = 16
    clip: float = 1.0
    max_devices: int = 100
    eps: float = 0.0
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    data_dir: str | None = None

    def validate(self) -> None:
        if self.devices < 1:
            raise ValueError("--devices must be >= 1")
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if self.rule not in ("fedavg", "eq3"):
            raise ValueError("--rule must be 'fedavg' or 'eq3'")
        if self.non_iid is not None and not 1 <= self.non_iid <= 10:
            raise ValueError("--non-iid K needs 1 <= K <= 10 classes per device")
        if self.encrypted:
            if not 1 <= self.threshold <= self.holders:
                raise ValueError(f"need 1 <= threshold <= holders, got t={self.threshold}, l={self.holders}")
            if self.devices > self.max_devices:
                raise ValueError(
                    f"{self.devices} devices exceed the codec layout's max_devices={self.max_devices}"
                )
        if self.workers < 1:
            raise ValueError("workers must be >= 1")

    def per_device(self, n_train: int) -> int:
        if self.samples_per_device is not None:
            return self.samples_per_device
        return min(PAPER_SAMPLES_PER_DEVICE, n_train // self.devices)


# --- worker process side -----------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _shards(cfg: SimulationConfig, labels: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 0xDA7A])
    per = cfg.per_device(len(labels))
    if cfg.non_iid is None:
        return partition_iid(len(labels), cfg.devices, per, rng)
    return partition_non_iid(labels, cfg.devices, cfg.non_iid, per, rng)


def _rule(cfg: SimulationConfig) -> FedAvgSGD | VarianceReduced:
    cls = FedAvgSGD if cfg.rule == "fedavg" else VarianceReduced
    return cls(lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.local_epochs)


def _worker_init(cfg: SimulationConfig, tpk: dict[str, Any] | None, layout: dict[str, Any] | None) -> None:
    data = load_fashion_mnist(cfg.data_dir)
    shards = _shards(cfg, data.train_y)
    _STATE.update(
        cfg=cfg,
        x=[data.train_x[s] for s in shards],
        y=[data.train_y[s] for s in shards],
        tpk=ThresholdPublicKey.from_dict(tpk) if tpk else None,
        layout=SlotLayout.from_dict(layout) if layout else None,
        table=None,
        test_x=data.test_x,
        test_y=data.test_y,
    )


def _train_task(device: int, round_no: int, weights: np.ndarray, total_samples: int) -> dict[str, Any]:
    """One device's round: train, clip the update, and encrypt it (or hand it over in the clear)."""
    cfg: SimulationConfig = _STATE["cfg"]
    t0 = time.process_time()
    rng = np.random.default_rng([cfg.seed, round_no, device])
    result = _rule(cfg).run(weights, _STATE["x"][device], _STATE["y"][device], rng)
    delta = result.weights - weights
    clipped = int(np.count_nonzero(np.abs(delta) > cfg.clip))
    delta = np.clip(delta, -cfg.clip, cfg.clip)
    train_cpu = time.process_time() - t0
    out: dict[str, Any] = {
        "device": device,
        "samples": result.samples,
        "train_loss": result.train_loss,
        "clipped": clipped,
        "train_cpu_s": train_cpu,
    }
    if cfg.encrypted:
        t1 = time.process_time()
        tpk: ThresholdPublicKey = _STATE["tpk"]
        if _STATE["table"] is None:
            _STATE["table"] = FixedBaseTable(tpk.public_key)
        weight = sample_weight(result.samples, total_samples)
        cts = encrypt_update(_STATE["layout"], tpk.public_key, OnTheSpot(_STATE["table"]), delta, weight)
        out["ciphertexts"] = tpk.public_key.ciphertexts_to_bytes(cts)
        out["weight"] = weight
        out["encrypt_cpu_s"] = time.process_time() - t1
    else:
        out["delta"] = delta.astype(np.float32)
    return out


def _partial_task(share: dict[str, Any], blob: bytes, context: bytes) -> PartialDecryption:
    key = KeyShare.from_dict(share)
    cts = key.public.public_key.ciphertexts_from_bytes(blob)
    return key.partial_decrypt(cts, context)


def _local_only_task(device: int, init: np.ndarray, rounds_run: int) -> list[float]:
    """The device trained alone, from the same initial model with the same local rule and batches, evaluated
    on the test set after each round's worth of epochs (the last entry: the same epochs the federation ran)."""
    cfg: SimulationConfig = _STATE["cfg"]
    weights = init
    curve = []
    for round_no in range(1, rounds_run + 1):
        rng = np.random.default_rng([cfg.seed, round_no, device])
        weights = _rule(cfg).run(weights, _STATE["x"][device], _STATE["y"][device], rng).weights
        curve.append(evaluate(unflatten(weights), _STATE["test_x"], _STATE["test_y"])[1])
    return curve


# --- coordinator side --------------------------------------------------------------------------------


@contextmanager
def _pool(
    cfg: SimulationConfig, tpk: ThresholdPublicKey | None, layout: SlotLayout | None
) -> Iterator[ProcessPoolExecutor]:
    # One BLAS thread per simulated device process, else N devices on 2 cores crawl (DEVELOPERS.md).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    ctx = multiprocessing.get_context("spawn")
    args = (cfg, tpk.to_dict() if tpk else None, layout.to_dict() if layout else None)
    with ProcessPoolExecutor(
        max_workers=min(cfg.workers, cfg.devices), mp_context=ctx, initializer=_worker_init, initargs=args
    ) as pool:
        yield pool


def run_simulation(cfg: SimulationConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the federated experiment and return the JSON-ready result."""
    cfg.validate()
    emit = progress or (lambda _event, _data: None)
    # Load here first: a missing dataset fails fast, naming the Debian package, before any worker starts.
    data = load_fashion_mnist(cfg.data_dir)
    shards = _shards(cfg, data.train_y)
    train_x = np.concatenate([data.train_x[s] for s in shards])
    train_y = np.concatenate([data.train_y[s] for s in shards])
    samples = [len(s) for s in shards]
    total = sum(samples)

    tpk: ThresholdPublicKey | None = None
    shares: list[KeyShare] = []
    layout: SlotLayout | None = None
    keygen_s = 0.0
    if cfg.encrypted:
        emit("keygen", {"bits": cfg.key_bits, "t": cfg.threshold, "l": cfg.holders})
        t0 = time.perf_counter()
        tpk, shares = deal(cfg.threshold, cfg.holders, cfg.key_bits, allow_insecure=cfg.key_bits < 2048)
        keygen_s = time.perf_counter() - t0
        layout = SlotLayout(cfg.key_bits, cfg.value_bits, cfg.clip, cfg.max_devices)

    weights = flatten(init_params(np.random.default_rng([cfg.seed, 0x1417])))
    init = weights.copy()
    rounds: list[dict[str, Any]] = []
    best = BestRound()
    clipped_total = 0
    max_error_bound = 0.0
    with _pool(cfg, tpk, layout) as pool:
        for round_no in range(1, cfg.rounds + 1):
            t_round = time.perf_counter()
            emit("round_start", {"round": round_no, "devices": cfg.devices})
            futures = [pool.submit(_train_task, d, round_no, weights, total) for d in range(cfg.devices)]
            acc = (
                Accumulator(tpk.public_key, layout.ciphertexts_for(len(weights)), cfg.max_devices)
                if tpk and layout
                else None
            )
            plain_sum = np.zeros(len(weights), dtype=np.float64)
            included_weight = 0.0
            wire_bytes = 0
            for fut in as_completed(futures):
                res = fut.result()
                clipped_total += res["clipped"]
                if acc is not None and tpk is not None:
                    cts = tpk.public_key.ciphertexts_from_bytes(res["ciphertexts"])
                    acc.add(cts)
                    included_weight += res["weight"]
                    wire_bytes += len(res["ciphertexts"])
                else:
                    plain_sum += res["samples"] * res["delta"].astype(np.float64)
                    wire_bytes += res["delta"].nbytes
                emit("device_done", {"round": round_no, "device": res["device"]})
            if acc is not None and tpk is not None and layout is not None:
                emit("decrypt_start", {"round": round_no, "holders": cfg.threshold})
                aggregate = acc.result()
                blob = tpk.public_key.ciphertexts_to_bytes(aggregate)
                context = f"sim/{cfg.seed}/round/{round_no}".encode()
                # t of the l holders decrypt; combine verifies each batch proof before using a partial.
                pfuts: list[Future[PartialDecryption]] = [
                    pool.submit(_partial_task, s.to_dict(), blob, context) for s in shares[: cfg.threshold]
                ]
                partials = [f.result() for f in pfuts]
                combined = combine(tpk, aggregate, partials, context)
                mean_delta = decode_aggregate(
                    layout, combined.plaintexts, len(weights), included_weight, acc.summands
                )
                max_error_bound = max(max_error_bound, layout.error_bound(included_weight, acc.summands))
            else:
                mean_delta = plain_sum / total
            previous = weights
            weights = (weights.astype(np.float64) + mean_delta).astype(np.float32)
            params = unflatten(weights)
            global_loss, _ = evaluate(params, train_x, train_y)
            _, global_acc = evaluate(params, data.test_x, data.test_y)
            best.update(round_no, global_loss, weights)
            entry = {
                "round": round_no,
                "global_accuracy": global_acc,
                "global_loss": global_loss,
                "seconds": time.perf_counter() - t_round,
                "wire_bytes": wire_bytes,
            }
            rounds.append(entry)
            emit("round_done", entry)
            if cfg.eps > 0 and converged(previous, weights, cfg.eps):
                emit("converged", {"round": round_no})
                break
        emit("local_only_start", {"devices": cfg.devices})
        local_futs = [pool.submit(_local_only_task, d, init, len(rounds)) for d in range(cfg.devices)]
        local_curves = np.array([f.result() for f in local_futs])
        emit("local_only_done", {"devices": cfg.devices})
    local_acc = local_curves[:, -1].tolist()

    assert best.weights is not None and best.round is not None
    _, final_acc = evaluate(unflatten(best.weights), data.test_x, data.test_y)
    return {
        "mode": "encrypted" if cfg.encrypted else "plaintext",
        "devices": cfg.devices,
        "samples_per_device": samples,
        "non_iid": cfg.non_iid,
        "seed": cfg.seed,
        "rule": cfg.rule,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "local_epochs": cfg.local_epochs,
        "rounds": rounds,
        "local_accuracy": local_acc,
        "local_accuracy_mean": float(np.mean(local_acc)),
        "local_accuracy_curve": local_curves.mean(axis=0).tolist(),
        "final_round": best.round,
        "final_accuracy": final_acc,
        "clipped_values": clipped_total,
        "crypto": (
            {
                "key_bits": cfg.key_bits,
                "threshold": cfg.threshold,
                "holders": cfg.holders,
                "keygen_s": keygen_s,
                "layout": layout.to_dict(),
                "ciphertexts_per_update": layout.ciphertexts_for(len(weights)),
                "max_decode_error_bound": max_error_bound,
            }
            if layout is not None
            else None
        ),
    }


def local_only_curves(cfg: SimulationConfig, rounds: int) -> np.ndarray:
    """Each device trained alone for ``rounds`` rounds' worth of epochs (test accuracy after each): the
    baseline the federation is compared with, computed exactly as ``run_simulation`` does."""
    with _pool(cfg, None, None) as pool:
        init = flatten(init_params(np.random.default_rng([cfg.seed, 0x1417])))
        futures = [pool.submit(_local_only_task, d, init, rounds) for d in range(cfg.devices)]
        return np.array([f.result() for f in futures])


def expected_minutes(cfg: SimulationConfig) -> float:
    """Rough duration on 2 x86 cores, for telling the user up front (see README figures)."""
    train = cfg.devices * cfg.local_epochs * 4.0 / min(cfg.workers, cfg.devices)
    decrypt = 0.0
    if cfg.encrypted:
        cts = SlotLayout(cfg.key_bits, cfg.value_bits, cfg.clip, cfg.max_devices).ciphertexts_for(252_398)
        per_ct = 0.020 * (cfg.key_bits / 2048) ** 3
        decrypt = cts * per_ct * math.ceil(cfg.threshold / cfg.workers) + cfg.devices * 1.0 / cfg.workers
    return (cfg.rounds * (train + decrypt + 3) + cfg.rounds * train) / 60
