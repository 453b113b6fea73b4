"""The broker access-control list of DESIGN §3, as data, rendered for Mosquitto and for amqtt.

Why this exists: a device's MQTT username *is* its checksummed address, and the gateway trusts the topic a
message arrived on (``dev/<addr>/update``) only because the broker lets nobody else publish there. The same
rules must hold on both brokers the gateway can run with (embedded amqtt for the demo, Mosquitto in
production), so they are written once here and rendered twice; tests check the model itself
(:meth:`AclRules.may_publish`, :meth:`AclRules.may_subscribe`) and then both brokers against it.

The rules, under the fleet prefix ``bdn/v1/<fleet>/``:

* a **device** publishes only its own ``dev/<addr>/update``, ``dev/<addr>/state`` (its last will) and
  ``dev/<addr>/report``, and its own partial decryptions ``share/+/<addr>``; it may subscribe to ``round``,
  ``global/#``, ``share/#``, ``gateway/state`` and its own ``dev/<addr>/#`` (its receipts), never to other
  devices' topics. It may not publish its own receipt either: receipts speak for the gateway.
* the **gateway** alone publishes ``round``, ``global/#``, ``dev/+/receipt`` and ``gateway/state``, and may
  subscribe to everything under the prefix;
* a **monitor** (dashboards, audit taps) may subscribe to everything under the prefix and publish nothing;
* the gateway also speaks **Sparkplug B** (its edge node publishes ``spBv1.0/...`` and reads its NCMD
  commands there), and monitors may read that namespace (a SCADA host on the local broker);
* anyone else, including anonymous clients, gets nothing.

Every entry is explicit and per user: amqtt's ``TopicAccessControlListPlugin`` has no ``%u`` substitution,
and writing Mosquitto's file the same way keeps the two renderings line-for-line comparable.

This module is pure (no broker or client imports) so the core, provisioning and the gateway can all use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from blockdeepnet.wire import Topics, WireError

if TYPE_CHECKING:
    from blockdeepnet.fleet import Fleet

Role = Literal["gateway", "device", "monitor"]
SPARKPLUG: Final = "spBv1.0/#"
"""The Sparkplug B namespace (``spBv1.0/<group>/<type>/<edge node>[/<device>]``)."""

USERNAME_RE: Final = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
"""Usernames the renderers accept. No whitespace (a Mosquitto ``user`` line ends at the line end, and a
stray space would silently name another user), no ``:`` (both brokers' password files split on it), no
MQTT wildcards or ``/``. Checksummed device addresses fit."""


class AclError(ValueError):
    """A username or user list that cannot be written safely into a broker ACL; the message says which."""


@dataclass(frozen=True)
class UserRules:
    """What one MQTT username may do. Entries are MQTT topic filters (``+`` and ``#`` allowed).

    ``subscribe`` also bounds what the user *receives*: a broker delivers only through subscriptions.
    """

    username: str
    role: Role
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class AclRules:
    """The ACL of one fleet: one :class:`UserRules` per username, gateway first, then devices, then monitors.

    Build it with :meth:`build` (or :meth:`for_fleet`); the constructor takes already-built rules so a test
    can state an ACL literally.
    """

    topics: Topics
    users: tuple[UserRules, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for u in self.users:
            _check_username(u.username)
            if u.username in seen:
                raise AclError(f"username {u.username!r} appears twice in the ACL")
            seen.add(u.username)
        if not any(u.role == "gateway" for u in self.users):
            # amqtt treats an empty publish ACL as "publishing unrestricted": an ACL always has a publisher.
            raise AclError("an ACL needs a gateway user")

    @classmethod
    def build(
        cls, topics: Topics, gateway: str, devices: Iterable[str], monitors: Iterable[str] = ()
    ) -> AclRules:
        """The DESIGN §3 rules for ``gateway``, each device username (= its checksummed address) and the
        read-only ``monitors``. Raises :class:`AclError` for an unusable or repeated username, or a device
        username that is not an EIP-55 address (its topics could not exist)."""
        users = [_gateway_rules(topics, gateway)]
        users += [_device_rules(topics, d) for d in devices]
        users += [_monitor_rules(topics, m) for m in monitors]
        return cls(topics, tuple(users))

    @classmethod
    def for_fleet(cls, fleet: Fleet, gateway: str, monitors: Iterable[str] = ()) -> AclRules:
        """:meth:`build` for every device registered in ``fleet.json``. The gateway's MQTT username is passed
        in because it is a broker credential, not the gateway's chain address."""
        return cls.build(Topics(fleet.name), gateway, (d.address for d in fleet.devices), monitors)

    @property
    def usernames(self) -> tuple[str, ...]:
        return tuple(u.username for u in self.users)

    def user(self, username: str | None) -> UserRules | None:
        for u in self.users:
            if u.username == username:
                return u
        return None

    def may_publish(self, username: str | None, topic: str) -> bool:
        """Whether ``username`` (None: anonymous) may publish on the concrete ``topic``."""
        rules = self.user(username)
        if rules is None or not _valid_topic(topic):
            return False
        return any(topic_matches(f, topic) for f in rules.publish)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        """Whether ``username`` may subscribe with ``topic_filter``: only if one of its allowed filters covers
        every topic the requested filter can match (so ``dev/+/update`` is refused to a device)."""
        rules = self.user(username)
        if rules is None or not _valid_filter(topic_filter):
            return False
        return any(filter_covers(f, topic_filter) for f in rules.subscribe)


def _check_username(name: object) -> str:
    if type(name) is not str or not USERNAME_RE.fullmatch(name):
        raise AclError(f"MQTT username {name!r:.80} must be 1..128 of [A-Za-z0-9_.@-]")
    return name


def _gateway_rules(topics: Topics, username: str) -> UserRules:
    p = topics.prefix
    return UserRules(
        username=_check_username(username),
        role="gateway",
        publish=(topics.round(), f"{p}global/#", f"{p}dev/+/receipt", topics.gateway_state(), SPARKPLUG),
        subscribe=(f"{p}#", SPARKPLUG),
    )


def _device_rules(topics: Topics, username: str) -> UserRules:
    addr = _check_username(username)
    p = topics.prefix
    try:
        own = (topics.update(addr), topics.state(addr), topics.report(addr))
    except WireError as exc:
        raise AclError(
            f"device username {addr!r} must be its EIP-55 checksummed address: {exc.message}"
        ) from None
    return UserRules(
        username=addr,
        role="device",
        publish=(*own, f"{p}share/+/{addr}"),
        subscribe=(topics.round(), f"{p}global/#", f"{p}share/#", topics.gateway_state(), f"{p}dev/{addr}/#"),
    )


def _monitor_rules(topics: Topics, username: str) -> UserRules:
    return UserRules(
        username=_check_username(username),
        role="monitor",
        publish=(),
        subscribe=(f"{topics.prefix}#", SPARKPLUG),
    )


# ------------------------------------------------------------------------------------------- topic matching


def _valid_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and not topic.startswith("$")


def _valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching of a concrete topic against a filter (``a/#`` also matches ``a``)."""
    if not _valid_filter(topic_filter) or not _valid_topic(topic):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or level not in ("+", t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic that filter ``requested`` matches is also matched by filter ``allowed``.

    This is the subscribe check: a ``+`` or ``#`` in the request is only covered by a wildcard at the same
    level of the allowed filter, so a device allowed ``dev/<own>/#`` cannot ask for ``dev/+/update``.
    """
    if not _valid_filter(allowed) or not _valid_filter(requested):
        return False
    a_levels = allowed.split("/")
    r_levels = requested.split("/")
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#" or (a != "+" and a != r):
            return False
    return len(a_levels) == len(r_levels)


# ---------------------------------------------------------------------------------------------- renderers


def mosquitto_acl(rules: AclRules) -> str:
    """The Mosquitto ``acl_file`` text: one ``user`` block per username with ``topic read|write|readwrite``
    lines, and no lines before the first block, so anonymous clients (if ever allowed) get no access."""
    out = [
        f"# Broker ACL of fleet {rules.topics.fleet} (DESIGN §3), generated by blockdeepnet.acl:",
        "# regenerate it from the fleet rather than editing it. No entries for anonymous clients.",
    ]
    for u in rules.users:
        out += ["", f"# {u.role}", f"user {u.username}"]
        for topic_filter in dict.fromkeys((*u.subscribe, *u.publish)):
            read, write = topic_filter in u.subscribe, topic_filter in u.publish
            access = "readwrite" if read and write else "read" if read else "write"
            out.append(f"topic {access} {topic_filter}")
    return "\n".join(out) + "\n"


def amqtt_acl(rules: AclRules) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(acl, publish_acl)`` for amqtt 0.12.1's ``TopicAccessControlListPlugin``, keyed by username.

    ``acl`` is its subscribe list (its strict config refuses the newer ``subscribe_acl`` key). Every user
    appears in both maps, a monitor with an empty publish list: the plugin refuses users with no entry or an
    empty list, but treats an entirely empty ``publish_acl`` as "anyone may publish anywhere".
    """
    subscribe = {u.username: list(u.subscribe) for u in rules.users}
    publish = {u.username: list(u.publish) for u in rules.users}
    return subscribe, publish


__all__ = [
    "USERNAME_RE",
    "AclError",
    "AclRules",
    "Role",
    "UserRules",
    "amqtt_acl",
    "filter_covers",
    "mosquitto_acl",
    "topic_matches",
]
