"""``python -m firmware_agent --config agent.toml``: the agent without the ``bdn`` CLI (e.g. a minimal device
image). Same behaviour as ``bdn agent run``: a set-up error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from blockdeepnet.logs import FORMATS, setup_logging
from firmware_agent.errors import AgentSetupError
from firmware_agent.service import build_agent, run_forever


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the device's agent.toml")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format",
        default=os.environ.get("BDN_LOG_FORMAT", "auto"),
        choices=FORMATS,
        help="as for `bdn agent run`: journal, json, text, or auto (journal under systemd, else text); "
        "default: $BDN_LOG_FORMAT or auto",
    )
    args = parser.parse_args(argv)
    try:
        log_format = setup_logging(args.log_level, args.log_format)
    except ValueError as exc:  # a bad $BDN_LOG_FORMAT (argparse does not check defaults)
        parser.error(str(exc))
    try:
        agent = build_agent(args.config)
    except AgentSetupError as exc:
        if log_format == "text":
            print(f"error: {exc}", file=sys.stderr)
        else:  # a bare line would not parse as JSON, nor carry a journal priority
            logging.getLogger("bdn").critical("error: %s", exc)
        return 2
    run_forever(agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
