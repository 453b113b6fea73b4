"""How the upstream bridge names topics on each side (remote prefix, default up filters), what it refuses to
bring down, and that the stock broker ACL lets the gateway's own credentials do what the bridge needs."""

from __future__ import annotations

import os

import pytest
from eth_utils.address import to_checksum_address

from blockdeepnet.acl import AclRules, topic_matches
from blockdeepnet.config import BridgeConfig
from blockdeepnet.wire import Topics
from gateway.bridge import Route


def _cfg(**kw: object) -> BridgeConfig:
    return BridgeConfig(enabled=True, host="plant", **kw)  # type: ignore[arg-type]


def test_up_puts_the_prefix_in_front() -> None:
    up = Route.up(_cfg(remote_prefix="plant1/", up=("site/#",)), "f")
    assert up.filters == ("site/#",)
    assert up.target_topic("site/line1/temp") == ("plant1/site/line1/temp", "")


def test_an_empty_prefix_keeps_topics_as_they_are() -> None:
    up, down = Route.up(_cfg(up=("a/#",), down=("cmd/#",)), "f"), Route.down(_cfg(down=("cmd/#",)))
    assert up.target_topic("a/b") == ("a/b", "")
    assert down.filters == ("cmd/#",)
    assert down.target_topic("cmd/stop") == ("cmd/stop", "")


def test_down_subscribes_behind_the_prefix_and_strips_it() -> None:
    down = Route.down(_cfg(remote_prefix="plant1/", down=("spBv1.0/G/NCMD/#", "cmd/+")))
    assert down.filters == ("plant1/spBv1.0/G/NCMD/#", "plant1/cmd/+")
    assert down.target_topic("plant1/spBv1.0/G/NCMD/n1") == ("spBv1.0/G/NCMD/n1", "")


@pytest.mark.parametrize("topic", ["plant2/cmd/x", "plant1/", "cmd/x"])
def test_down_refuses_topics_without_the_prefix(topic: str) -> None:
    assert Route.down(_cfg(remote_prefix="plant1/", down=("#",))).target_topic(topic) == (None, "prefix")


@pytest.mark.parametrize("topic", ["plant1/bdn/v1/f/round", "plant1/bdn/v1/f/global/3", "plant1/bdn/x"])
def test_nothing_comes_down_into_the_protocol_namespace(topic: str) -> None:
    """Rounds, global models and receipts speak for the gateway: the plant must not forge them."""
    assert Route.down(_cfg(remote_prefix="plant1/", down=("#",))).target_topic(topic) == (None, "protected")


def test_the_default_up_filters_are_the_fleets_public_state() -> None:
    t = Topics("f")
    filters = _cfg().up_filters("f")
    assert Route.up(_cfg(), "f").filters == filters
    assert _cfg(up=("x/#",)).up_filters("f") == ("x/#",)
    for topic in (t.gateway_state(), t.round(), t.state(str(to_checksum_address(os.urandom(20))))):
        assert any(topic_matches(f, topic) for f in filters)
    for topic in ("bdn/v1/f/global/1", "bdn/v1/other/round", "bdn/v1/f/dev/x/update"):
        assert not any(topic_matches(f, topic) for f in filters)


def test_the_gateway_acl_allows_what_the_bridge_does_with_its_credentials() -> None:
    """The bridge's local side logs in as the gateway: it must be allowed to read the default up filters
    and to publish Sparkplug commands that come down."""
    acl = AclRules.build(Topics("f"), "gateway", [])
    assert all(acl.may_subscribe("gateway", f) for f in _cfg().up_filters("f"))
    assert acl.may_publish("gateway", "spBv1.0/G/NCMD/f")
