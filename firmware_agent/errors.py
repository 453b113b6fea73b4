"""The one exception type a misconfigured agent raises before it starts.

Everything that can be wrong with a device's set-up (a key file readable by others, a share dealt for another
fleet, a state folder of another fleet, missing training data) is found at start-up and reported as
:class:`AgentSetupError` with a message that names the file and what to do, so ``bdn agent run`` can print one
line and exit 2 instead of failing hours later in the middle of a round.
"""

from __future__ import annotations


class AgentSetupError(Exception):
    """The agent cannot start with this configuration; the message says which file or key and why."""
