"""The appliance as deployed: gateway + real device agents, over Mosquitto with TLS, the generated password
file and ACL, on an anvil chain, for two rounds; one key holder never comes up.

Round 1's primary holders are 2 and 3, round 2's are 3 and 1 (docs/protocol.md): with holder 1 silent, round
2 can only be decrypted because standby holder 2 steps in after its delay. Every running device must end
with the same model, and both rounds must be committed on chain with the three updates that were sent.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from blockdeepnet.config import load_agent_config
from blockdeepnet.crypto.threshold import deal
from blockdeepnet.data import load_fashion_mnist
from firmware_agent import Agent
from gateway.broker import free_port
from provisioning.anvil import AnvilProcess
from provisioning.localfleet import create_local_fleet
from tests.support.gateway import GatewayThread
from tests.support.mosquitto import MosquittoProcess, MosquittoTls
from tests.support.tls import self_signed_cert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SAMPLES = 64


def test_two_rounds_with_a_silent_key_holder(tmp_path: Path) -> None:
    data = load_fashion_mnist()
    npz = []
    for k in range(4):
        path = tmp_path / f"data{k}.npz"
        sl = slice(k * SAMPLES, (k + 1) * SAMPLES)
        np.savez(path, x=data.train_x[sl], y=data.train_y[sl])
        npz.append(path)
    port = free_port("127.0.0.1")
    cert, key = self_signed_cert(tmp_path)
    with AnvilProcess(state_file=tmp_path / "chain.json") as anvil:
        local = create_local_fleet(
            tmp_path / "fleet",
            name=f"e2e{secrets.token_hex(3)}",
            devices=4,
            threshold=2,
            holders=3,
            dealt=deal(2, 3, 512, allow_insecure=True),
            samples=SAMPLES,
            chain_url=anvil.url,
            broker_port=port,
            broker_mode="external",
            broker_auth=True,
            gateway_extra={
                "rounds": {"max_rounds": 2, "min_updates": 3, "deadline_s": 20.0},
                "broker": {"tls_ca": str(cert)},
            },
            agent_extra=lambda k: {
                "broker": {"tls_ca": str(cert)},
                "data": {"source": "npz", "path": str(npz[k])},
                "standby_delay_s": 3.0,
                "receipt_timeout_s": 15.0,
            },
        )
        broker_dir = local.root / "broker"
        with MosquittoProcess(
            tmp_path / "mosquitto",
            port=port,
            password_file=broker_dir / "mosquitto.passwd",
            acl_file=broker_dir / "mosquitto.acl",
            allow_anonymous=False,
            tls=MosquittoTls(cafile=cert, certfile=cert, keyfile=key),
        ):
            silent = next(d for d in local.devices if d.key_share == 1)
            running = [d for d in local.devices if d is not silent]
            events: list[tuple[str, dict[str, object]]] = []
            with GatewayThread(local.gateway_config) as gt:
                agents = [
                    Agent(load_agent_config(d.config), on_event=lambda n, e: events.append((n, e)))
                    for d in running
                ]
                for a in agents:
                    a.start()
                try:
                    deadline = time.monotonic() + 240
                    while not all(a.applied_round >= 2 for a in agents):
                        assert time.monotonic() < deadline, (
                            f"agents stuck at {[a.applied_round for a in agents]}"
                        )
                        time.sleep(0.5)
                finally:
                    for a in agents:
                        a.stop()
                    for a in agents:
                        a.join(30)
                ledger = gt.gw.chain.ledger
                for r in (1, 2):
                    info = ledger.get_round(r)
                    assert info.committed and info.count == 3
                    assert {d for d, _ in ledger.recorded_updates(r)} == {d.address for d in running}
                reports = gt.named("report")
            models = [a.model() for a in agents]
            for m in models[1:]:
                np.testing.assert_array_equal(m, models[0])
            assert not np.array_equal(models[0], local.fleet.initial_model())
            combined = [e for n, e in events if n == "combined" and e["round"] == 2]
            assert combined and all(set(e["holders"]) == {2, 3} for e in combined)  # holder 1 never shared
            assert {(r["round"], r["device"]) for r in reports} >= {(2, d.address) for d in running}
