"""``python -m firmware_agent --config agent.toml``: the agent without the ``bdn`` CLI (e.g. a minimal device
image). Same behaviour as ``bdn agent run``: a set-up error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from firmware_agent.errors import AgentSetupError
from firmware_agent.service import build_agent, run_forever


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the device's agent.toml")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = build_agent(args.config)
    except AgentSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_forever(agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
