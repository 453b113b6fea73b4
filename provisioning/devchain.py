"""`bdn chain dev`: a persistent local chain with the BlockDeepNet contract deployed.

The chain state lives in ``<data_dir>/anvil-state.json`` (loaded at start, dumped when the node stops), the
gateway key in ``<data_dir>/gateway.key`` (mode 0600) and the deployment in ``<data_dir>/deployment.json``.
Restarting reuses all three; a deployment whose code is no longer on the chain (state file deleted) is redone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from blockdeepnet.ledger import Ledger, fund_from_node_account, rpc_web3
from provisioning.anvil import AnvilProcess
from provisioning.private_files import write_private

DEV_CHAIN_ID = 31337


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    rpc_url: str
    contract: str
    gateway: str
    deploy_block: int


def load_or_create_gateway_key(data_dir: Path) -> LocalAccount:
    path = data_dir / "gateway.key"
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by others; chmod 600 it")
        acct: LocalAccount = Account.from_key(path.read_text().strip())
        return acct
    acct = Account.create()
    write_private(path, acct.key.hex() + "\n")
    return acct


def start_dev_chain(data_dir: Path, port: int) -> tuple[AnvilProcess, Deployment]:
    """Start anvil on ``port`` with the data dir's state and make sure the contract is deployed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    node = AnvilProcess(port=port, state_file=data_dir / "anvil-state.json", chain_id=DEV_CHAIN_ID).start()
    try:
        gateway = load_or_create_gateway_key(data_dir)
        w3 = rpc_web3(node.url)
        record = data_dir / "deployment.json"
        if record.exists():
            previous = Deployment(**json.loads(record.read_text()))
            if len(w3.eth.get_code(w3.to_checksum_address(previous.contract))) > 0:
                deployment = Deployment(**{**asdict(previous), "rpc_url": node.url})
                record.write_text(json.dumps(asdict(deployment), indent=2) + "\n")
                return node, deployment
        fund_from_node_account(w3, gateway.address, 10**21)
        ledger = Ledger.deploy(w3, gateway)
        deployment = Deployment(
            DEV_CHAIN_ID, node.url, ledger.address, gateway.address, ledger.block_number()
        )
        record.write_text(json.dumps(asdict(deployment), indent=2) + "\n")
        return node, deployment
    except BaseException:
        node.stop()
        raise
