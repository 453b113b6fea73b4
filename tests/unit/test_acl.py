"""The DESIGN §3 broker ACL as data (blockdeepnet.acl): the rules themselves, topic matching, and the two
renderings (Mosquitto acl_file text, amqtt plugin dicts) that must say the same thing."""

from __future__ import annotations

import os

import pytest
from eth_utils.address import to_checksum_address
from hypothesis import given
from hypothesis import strategies as st

from blockdeepnet.acl import (
    AclError,
    AclRules,
    UserRules,
    amqtt_acl,
    filter_covers,
    mosquitto_acl,
    topic_matches,
)
from blockdeepnet.wire import Topics


def _addr() -> str:
    return str(to_checksum_address(os.urandom(20)))


A, B = _addr(), _addr()
T = Topics("unit-acl")
P = T.prefix
OTHER = Topics("other-fleet")


@pytest.fixture(scope="module")
def rules() -> AclRules:
    return AclRules.build(T, "gateway", [A, B], monitors=["dash"])


# ------------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "topic",
    [T.update(A), T.state(A), T.report(A), T.share(1, A), T.share(123456, A)],
)
def test_device_publishes_its_own_topics(rules: AclRules, topic: str) -> None:
    assert rules.may_publish(A, topic)


@pytest.mark.parametrize(
    "topic",
    [
        T.update(B),
        T.state(B),
        T.report(B),
        T.share(1, B),
        T.receipt(A),  # receipts speak for the gateway, even a device's own
        T.receipt(B),
        T.round(),
        T.global_block(1),
        T.gateway_state(),
        OTHER.update(A),
        f"{P}dev/{A}/update/extra",
        f"{P}dev/{A}/unknown",
        f"{P}dev/+/update",  # wildcards are never publishable
        "$SYS/broker/uptime",
        "",
    ],
)
def test_device_cannot_publish_elsewhere(rules: AclRules, topic: str) -> None:
    assert not rules.may_publish(A, topic)


@pytest.mark.parametrize(
    "topic_filter",
    [
        T.round(),
        T.all_globals(),
        f"{P}global/#",
        T.global_block(7),
        T.every_share(),
        T.all_shares(3),
        f"{P}share/#",
        T.gateway_state(),
        T.receipt(A),
        f"{P}dev/{A}/#",
        f"{P}dev/{A}/+",
    ],
)
def test_device_subscribes_to_fleet_and_own_topics(rules: AclRules, topic_filter: str) -> None:
    assert rules.may_subscribe(A, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        T.all_updates(),
        T.all_states(),
        T.all_reports(),
        T.update(B),
        T.receipt(B),
        f"{P}dev/{B}/#",
        f"{P}dev/#",
        f"{P}#",
        f"{P}+",
        "#",
        "bdn/v1/+/round",
        OTHER.round(),
        f"{P}dev/{A}/#/x",  # malformed filter
    ],
)
def test_device_cannot_subscribe_to_other_devices(rules: AclRules, topic_filter: str) -> None:
    assert not rules.may_subscribe(A, topic_filter)


# ------------------------------------------------------------------------------------- gateway and monitor


def test_gateway_publishes_only_its_topics(rules: AclRules) -> None:
    for topic in (T.round(), T.global_block(9), T.receipt(A), T.receipt(B), T.gateway_state()):
        assert rules.may_publish("gateway", topic), topic
    for topic in ("spBv1.0/BlockDeepNet/NBIRTH/f", "spBv1.0/BlockDeepNet/DDATA/f/dev0"):
        assert rules.may_publish("gateway", topic), topic
        assert not rules.may_publish("dash", topic) and not rules.may_publish(A, topic), topic
    assert rules.may_subscribe("gateway", "spBv1.0/BlockDeepNet/NCMD/f")
    assert rules.may_subscribe("dash", "spBv1.0/#") and not rules.may_subscribe(A, "spBv1.0/#")
    for topic in (T.update(A), T.state(A), T.share(1, A), T.report(B), OTHER.round()):
        assert not rules.may_publish("gateway", topic), topic


def test_gateway_and_monitor_subscribe_to_the_whole_fleet(rules: AclRules) -> None:
    for user in ("gateway", "dash"):
        for topic_filter in (f"{P}#", T.all_updates(), T.update(A), T.round(), T.every_share()):
            assert rules.may_subscribe(user, topic_filter), (user, topic_filter)
        assert not rules.may_subscribe(user, "#")
        assert not rules.may_subscribe(user, OTHER.all_updates())


def test_monitor_publishes_nothing(rules: AclRules) -> None:
    for topic in (T.round(), T.update(A), T.global_block(1), T.gateway_state(), T.receipt(A)):
        assert not rules.may_publish("dash", topic)


def test_unknown_and_anonymous_users_get_nothing(rules: AclRules) -> None:
    for user in (None, "stranger", A.lower()):
        assert not rules.may_publish(user, T.update(A))
        assert not rules.may_subscribe(user, T.round())


def test_rules_order_and_roles(rules: AclRules) -> None:
    assert rules.usernames == ("gateway", A, B, "dash")
    assert [u.role for u in rules.users] == ["gateway", "device", "device", "monitor"]
    assert rules.user("nobody") is None


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "devices",
    [
        [A.lower()],  # not checksummed: its topics would never match the builders'
        ["0x1234"],
        ["device one"],
        [A, A],
        ["gateway"],  # the gateway's name again (and not an address)
    ],
)
def test_bad_device_lists_are_refused(devices: list[str]) -> None:
    with pytest.raises(AclError):
        AclRules.build(T, "gateway", devices)


@pytest.mark.parametrize("name", ["", "gate way", "gw:1", "gw\n", "gw/1", "gw#", "x" * 129])
def test_unsafe_usernames_are_refused(name: str) -> None:
    with pytest.raises(AclError):
        AclRules.build(T, name, [A])
    with pytest.raises(AclError):
        AclRules.build(T, "gateway", [A], monitors=[name])


def test_monitor_named_like_a_device_is_refused() -> None:
    with pytest.raises(AclError, match="twice"):
        AclRules.build(T, "gateway", [A], monitors=[A])


def test_an_acl_without_gateway_is_refused() -> None:
    with pytest.raises(AclError, match="gateway"):
        AclRules(T, (UserRules("dash", "monitor", (), (f"{P}#",)),))


def test_for_fleet_lists_every_registered_device() -> None:
    from blockdeepnet.crypto.codec import SlotLayout
    from blockdeepnet.crypto.threshold import deal
    from blockdeepnet.fleet import ChainInfo, DeviceEntry, Fleet

    tpk, _ = deal(2, 2, 512, allow_insecure=True)
    fleet = Fleet(
        name="fleet-acl",
        chain=ChainInfo("embedded", 1337, _addr()),
        gateway=_addr(),
        public_key=tpk,
        layout=SlotLayout(key_bits=512),
        model_seed=1,
        devices=(DeviceEntry(A.lower(), 10), DeviceEntry(B, 20)),
    )
    rules = AclRules.for_fleet(fleet, "gw", monitors=["dash"])
    assert rules.usernames == ("gw", A, B, "dash")
    assert rules.topics == Topics("fleet-acl")


# --------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),  # MQTT 3.1.1 §4.7.1.2: the parent level matches too
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/#/c", "a/b/c", False),  # invalid filter
        ("a/b+", "a/b+", False),  # invalid filter
        ("a/+", "a/+", False),  # not a topic
        ("#", "$SYS/x", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("a/#", "a/+", True),
        ("a/#", "a/#", True),
        ("a/#", "a/b/#", True),
        ("a/#", "a", True),
        ("a/+", "a/+", True),
        ("a/+", "a/b", True),
        ("a/+", "a/#", False),
        ("a/b", "a/+", False),
        ("a/b/#", "a/#", False),
        ("a/+/c", "a/+/c", True),
        ("a/+/c", "a/+/+", False),
        ("+", "#", False),
    ],
)
def test_filter_covers(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


_level = st.sampled_from(["a", "b", "c"])
_filter_level = st.sampled_from(["a", "b", "c", "+"])


@st.composite
def _filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_filter_level, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@given(_filters(), _filters(), st.lists(_level, min_size=1, max_size=5).map("/".join))
def test_a_covering_filter_matches_everything_the_covered_one_does(
    allowed: str, requested: str, topic: str
) -> None:
    if filter_covers(allowed, requested) and topic_matches(requested, topic):
        assert topic_matches(allowed, topic)


# -------------------------------------------------------------------------------------------- renderers


def _parse_mosquitto(text: str) -> dict[str, dict[str, str]]:
    """user -> {topic filter: access}; fails on any line a Mosquitto acl_file should not contain here."""
    users: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword == "user":
            assert rest not in users, f"user {rest} twice"
            current = users[rest] = {}
        elif keyword == "topic":
            assert current is not None, (
                "topic line before the first user line would apply to anonymous clients"
            )
            access, _, topic_filter = rest.partition(" ")
            assert access in ("read", "write", "readwrite"), line
            assert " " not in topic_filter and topic_filter not in current, line
            current[topic_filter] = access
        else:
            raise AssertionError(f"unexpected acl line {line!r}")
    return users


def test_mosquitto_rendering_says_exactly_what_the_rules_say(rules: AclRules) -> None:
    parsed = _parse_mosquitto(mosquitto_acl(rules))
    assert list(parsed) == list(rules.usernames)
    for u in rules.users:
        reads = {f for f, a in parsed[u.username].items() if a in ("read", "readwrite")}
        writes = {f for f, a in parsed[u.username].items() if a in ("write", "readwrite")}
        assert reads == set(u.subscribe)
        assert writes == set(u.publish)
    assert "pattern" not in mosquitto_acl(rules)


def test_mosquitto_rendering_of_a_device_block() -> None:
    text = mosquitto_acl(AclRules.build(T, "gw", [A]))
    block = text.split(f"user {A}\n", 1)[1].strip().splitlines()
    assert block == [
        f"topic read {P}round",
        f"topic read {P}global/#",
        f"topic read {P}share/#",
        f"topic read {P}gateway/state",
        f"topic read {P}dev/{A}/#",
        f"topic write {P}dev/{A}/update",
        f"topic write {P}dev/{A}/state",
        f"topic write {P}dev/{A}/report",
        f"topic write {P}share/+/{A}",
    ]
    assert text.endswith("\n")


def test_amqtt_rendering_keys_every_user(rules: AclRules) -> None:
    subscribe, publish = amqtt_acl(rules)
    assert list(subscribe) == list(publish) == list(rules.usernames)
    assert publish["dash"] == []
    for u in rules.users:
        assert subscribe[u.username] == list(u.subscribe)
        assert publish[u.username] == list(u.publish)


def test_amqtt_matcher_agrees_with_the_model_on_the_rendered_rules(rules: AclRules) -> None:
    """amqtt's own matcher, fed our rendered lists, decides as the model does for every filter a client of
    the fleet might try (amqtt is stricter only for ``a/#`` versus ``a``, which no fleet topic uses)."""
    topic_checking = pytest.importorskip("amqtt.plugins.topic_checking")
    topic_ac = topic_checking.TopicAccessControlListPlugin.topic_ac
    subscribe, publish = amqtt_acl(rules)
    requests = [
        T.round(),
        T.all_updates(),
        T.update(A),
        T.update(B),
        T.receipt(A),
        T.receipt(B),
        f"{P}dev/{A}/#",
        f"{P}#",
        T.all_globals(),
        T.global_block(2),
        T.every_share(),
        T.share(2, A),
        T.share(2, B),
        T.gateway_state(),
        "#",
    ]
    for user in (*rules.usernames, "stranger"):
        for req in requests:
            amqtt_sub = any(topic_ac(req, f) for f in subscribe.get(user, []))
            assert amqtt_sub == rules.may_subscribe(user, req), (user, req)
            if "+" not in req and "#" not in req:
                amqtt_pub = any(topic_ac(req, f) for f in publish.get(user, []))
                assert amqtt_pub == rules.may_publish(user, req), (user, req)
