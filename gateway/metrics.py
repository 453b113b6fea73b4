"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one test process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from blockdeepnet.wire import ReasonCode

# No `*_created` timestamp series next to every counter: noise on a dashboard, and per-process anyway.
disable_created_metrics()

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.rounds = Counter("bdn_rounds", "Rounds finished, by outcome", ["outcome"], registry=r)
        self.current_round = Gauge("bdn_current_round", "Round number currently open or closing", registry=r)
        self.accepted = Counter("bdn_updates_accepted", "Updates recorded on chain", registry=r)
        self.rejected = Counter("bdn_updates_rejected", "Updates refused, by reason", ["reason"], registry=r)
        for reason in ReasonCode:  # every label present from the start: a 0 is data, a gap is not
            self.rejected.labels(reason.value)
        self.round_latency = Histogram(
            "bdn_round_latency_seconds",
            "Round open to global block published",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.close_latency = Histogram(
            "bdn_round_close_latency_seconds",
            "Last update accepted to global block published",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chain_height = Gauge("bdn_chain_height", "Latest block number seen", registry=r)
        self.devices_online = Gauge(
            "bdn_devices_online", "Devices whose retained state is online", registry=r
        )
        self.outbox_pending = Gauge(
            "bdn_outbox_pending", "Chain transactions waiting in the outbox", registry=r
        )
        self.global_accuracy = Gauge(
            "bdn_global_accuracy",
            "Test accuracy of the last global model, as reported by devices",
            registry=r,
        )
        self.best_round = Gauge("bdn_best_round", "Round with the lowest reported global loss", registry=r)
        self.bridge_connected = Gauge(
            "bdn_bridge_connected",
            "Whether the bridge is connected, by side (local, plant)",
            ["side"],
            registry=r,
        )
        self.bridge_forwarded = Counter(
            "bdn_bridge_forwarded",
            "Messages the bridge delivered and had acknowledged, by direction (up, down)",
            ["direction"],
            registry=r,
        )
        self.bridge_dropped = Counter(
            "bdn_bridge_dropped", "Messages the bridge refused to forward, by reason", ["reason"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
