"""`bdn agent`: the device daemon (firmware_agent) from the command line."""

from __future__ import annotations

from pathlib import Path

import click

from blockdeepnet.logs import setup_logging
from cli.log_options import fatal, log_format_option, log_level_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def agent() -> None:
    """The device agent: trains locally, publishes encrypted signed updates, shares decryption duty."""


@agent.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The device's agent.toml.",
)
@log_level_option
@log_format_option
def run(config_path: Path, log_level: str, log_format: str) -> None:
    """Run the agent in the foreground until SIGTERM or Ctrl-C.

    Set-up problems (config, key file permissions, key share, data, state folder) are reported before it
    connects, as one line, with exit status 2. Broker and chain outages are not errors: it retries.
    """
    from firmware_agent.errors import AgentSetupError
    from firmware_agent.service import build_agent, run_forever

    log_format = setup_logging(log_level, log_format)
    try:
        device = build_agent(config_path)
    except AgentSetupError as exc:
        fatal(str(exc), log_format)
    run_forever(device)


from cli.agent_predict import predict  # noqa: E402  (a separate module; registered on the group defined above)

agent.add_command(predict)

from cli.agent_enroll import enroll  # noqa: E402

agent.add_command(enroll)

from cli.agent_keys import keys  # noqa: E402

agent.add_command(keys)
