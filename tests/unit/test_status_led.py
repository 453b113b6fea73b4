"""Status LED and button: event sequences -> LED states, the blink thread, the button, the backends, and the
wiring into ``build_agent``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import firmware_agent.service as service
import firmware_agent.status_led as status_led
from blockdeepnet.config import StatusConfig
from blockdeepnet.crypto.threshold import KeyShare, ThresholdPublicKey, deal
from firmware_agent.errors import AgentSetupError
from firmware_agent.status_led import (
    GpioBackend,
    LedState,
    MockBackend,
    StatusError,
    StatusIndicator,
    create_indicator,
    import_gpio,
)
from tests.unit.test_agent_support import write_fleet

FAST = 0.01  # blink half-period in tests


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def mock() -> MockBackend:
    return MockBackend()


@pytest.fixture
def indicator(mock: MockBackend) -> Iterator[StatusIndicator]:
    ind = StatusIndicator(mock, blink_interval_s=FAST)
    yield ind
    ind.close()


def feed(ind: StatusIndicator, *events: tuple[str, dict[str, Any]]) -> list[LedState]:
    states = []
    for name, data in events:
        ind.on_event(name, {"device": "0xabc", **data})
        states.append(ind.state)
    return states


# --- events -> states ------------------------------------------------------------------------------------


def test_a_normal_round_blinks_while_training_and_ends_idle(
    indicator: StatusIndicator, mock: MockBackend
) -> None:
    states = feed(
        indicator,
        ("started", {"applied_round": 0}),
        ("connected", {"session_present": False}),
        ("round_open", {"round": 1}),
        ("training", {"round": 1}),
    )
    assert states == [LedState.IDLE, LedState.IDLE, LedState.IDLE, LedState.TRAINING]
    assert indicator.blinking
    wait_for(lambda: mock.toggles >= 4)  # really blinking: on, off, on, off
    states = feed(
        indicator,
        ("update_published", {"round": 1}),
        ("trained", {"round": 1}),
        ("receipt", {"round": 1, "accepted": True}),
        ("combined", {"round": 1}),
        ("applied", {"round": 1}),
    )
    assert states == [LedState.TRAINING, LedState.IDLE, LedState.IDLE, LedState.IDLE, LedState.IDLE]
    assert not indicator.blinking and not mock.led_on
    assert mock.states == [LedState.TRAINING, LedState.IDLE]  # the mock logged each change once
    assert indicator.last_round == 1


def test_blinking_stops_and_the_thread_ends(indicator: StatusIndicator, mock: MockBackend) -> None:
    before = threading.active_count()
    indicator.set_state(LedState.TRAINING)
    assert threading.active_count() == before + 1
    wait_for(lambda: mock.toggles >= 3)
    indicator.set_state(LedState.ERROR)
    assert not indicator.blinking and threading.active_count() == before
    toggles = mock.toggles
    time.sleep(10 * FAST)
    assert mock.toggles == toggles and mock.led_on  # solid on, nothing toggles it any more


@pytest.mark.parametrize(
    "event",
    [
        ("error", {"message": "boom"}),
        ("overflow", {"round": 2, "message": "slot overflow"}),
        ("publish_gave_up", {"round": 2, "attempts": 5}),
        ("connect_failed", {"reason": "Not authorized"}),
        ("disconnected", {"reason": "Unspecified error"}),
        ("receipt", {"round": 2, "accepted": False, "reason": "bad-signature"}),
    ],
)
def test_failures_light_the_led_solid(
    event: tuple[str, dict[str, Any]], indicator: StatusIndicator, mock: MockBackend
) -> None:
    feed(indicator, ("training", {"round": 2}), event)
    assert indicator.state is LedState.ERROR and mock.led_on and not indicator.blinking


def test_an_error_lasts_until_the_agent_recovers(indicator: StatusIndicator, mock: MockBackend) -> None:
    states = feed(
        indicator,
        ("training", {"round": 3}),
        ("error", {"round": 3, "message": "no update this round"}),
        ("round_open", {"round": 4}),
        ("receipt", {"round": 2, "accepted": True}),
        ("connected", {"session_present": True}),
    )
    assert states == [LedState.TRAINING, LedState.ERROR, LedState.ERROR, LedState.ERROR, LedState.IDLE]
    feed(indicator, ("disconnected", {"reason": "Keep alive timeout"}), ("training", {"round": 4}))
    assert indicator.state is LedState.TRAINING  # the next round's training replaces the error


def test_a_reconnect_does_not_interrupt_blinking(indicator: StatusIndicator) -> None:
    feed(indicator, ("training", {"round": 5}), ("connected", {"session_present": True}))
    assert indicator.state is LedState.TRAINING and indicator.blinking


def test_shutdown_is_not_an_error_and_releases_the_backend(
    indicator: StatusIndicator, mock: MockBackend
) -> None:
    states = feed(
        indicator,
        ("training", {"round": 6}),
        ("disconnected", {"reason": "Success"}),  # a disconnect the agent asked for is no error
        ("stopped", {}),
        ("error", {"message": "late"}),  # after close: ignored
        ("training", {"round": 7}),
    )
    assert states == [LedState.TRAINING, LedState.TRAINING, LedState.IDLE, LedState.IDLE, LedState.IDLE]
    assert mock.closed and not mock.led_on and not indicator.blinking


# --- the button ----------------------------------------------------------------------------------------


def test_the_button_calls_its_handler_and_survives_its_failure(
    indicator: StatusIndicator, mock: MockBackend, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    indicator.on_press = lambda: calls.append(1)
    mock.press()
    mock.press()
    assert calls == [1, 1] and indicator.presses == 2

    def broken() -> None:
        raise RuntimeError("handler bug")

    indicator.on_press = broken
    with caplog.at_level(logging.ERROR):
        mock.press()  # must not raise: on RPi.GPIO's thread nobody would catch it
    assert "status button handler failed" in caplog.text and indicator.presses == 3


# --- backends ------------------------------------------------------------------------------------------


def test_off_does_nothing() -> None:
    before = threading.active_count()
    assert create_indicator(StatusConfig(backend="off")) is None
    assert threading.active_count() == before


def test_auto_falls_back_to_the_mock_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    def missing() -> ModuleType:
        raise ImportError("No module named 'RPi'")

    with caplog.at_level(logging.INFO, logger="firmware_agent.status"):
        ind = create_indicator(StatusConfig(backend="auto"), gpio_loader=missing)
    assert ind is not None and isinstance(ind.backend, MockBackend)
    assert "RPi.GPIO not usable" in caplog.text and "No module named 'RPi'" in caplog.text
    ind.close()


def test_gpio_that_cannot_be_used_is_a_setup_error() -> None:
    def not_a_pi() -> ModuleType:
        raise RuntimeError("This module can only be run on a Raspberry Pi!")

    with pytest.raises(StatusError, match=r"status.backend is 'gpio' but RPi.GPIO cannot drive the pins"):
        create_indicator(StatusConfig(backend="gpio"), gpio_loader=not_a_pi)
    with pytest.raises(StatusError, match="both BCM 5"):
        create_indicator(StatusConfig(backend="gpio", led_pin=5, button_pin=5), gpio_loader=FakeGpio)


class FakeGpio(ModuleType):
    """Records what the backend asks of RPi.GPIO (same constants and calls), to check the pin wiring off a Pi."""

    BCM, OUT, IN, HIGH, LOW, PUD_UP, FALLING = "BCM", "OUT", "IN", 1, 0, "PUD_UP", "FALLING"

    def __init__(self) -> None:
        super().__init__("RPi.GPIO")
        self.calls: list[tuple[Any, ...]] = []
        self.levels: dict[int, int] = {}
        self.edge_callback: Any = None
        self.edge_error = False

    def setwarnings(self, flag: bool) -> None:
        self.calls.append(("setwarnings", flag))

    def setmode(self, mode: str) -> None:
        self.calls.append(("setmode", mode))

    def setup(self, pin: int, direction: str, **kwargs: Any) -> None:
        self.calls.append(("setup", pin, direction, kwargs))

    def output(self, pin: int, level: int) -> None:
        self.levels[pin] = level

    def add_event_detect(self, pin: int, edge: str, callback: Any, bouncetime: int) -> None:
        if self.edge_error:
            raise RuntimeError("Failed to add edge detection")
        self.calls.append(("add_event_detect", pin, edge, bouncetime))
        self.edge_callback = callback

    def remove_event_detect(self, pin: int) -> None:
        self.calls.append(("remove_event_detect", pin))

    def cleanup(self, pins: tuple[int, ...]) -> None:
        self.calls.append(("cleanup", pins))


def test_gpio_backend_wiring_with_a_stand_in_module() -> None:
    fake = FakeGpio()
    pressed: list[int] = []
    ind = create_indicator(
        StatusConfig(backend="gpio", led_pin=17, button_pin=27),
        lambda: pressed.append(1),
        gpio_loader=lambda: fake,
    )
    assert ind is not None and isinstance(ind.backend, GpioBackend)
    ind.blink_interval_s = FAST
    assert ("setmode", "BCM") in fake.calls
    assert ("setup", 17, "OUT", {"initial": 0}) in fake.calls
    assert ("setup", 27, "IN", {"pull_up_down": "PUD_UP"}) in fake.calls
    assert ("add_event_detect", 27, "FALLING", 200) in fake.calls
    fake.edge_callback(27)  # what RPi.GPIO's thread does on a falling edge
    assert pressed == [1]
    ind.set_state(LedState.ERROR)
    assert fake.levels[17] == 1
    ind.set_state(LedState.IDLE)
    assert fake.levels[17] == 0
    ind.close()
    assert ("remove_event_detect", 27) in fake.calls and ("cleanup", (17, 27)) in fake.calls


def test_pins_are_released_when_the_button_cannot_be_watched(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeGpio()
    fake.edge_error = True
    with pytest.raises(StatusError, match="Failed to add edge detection"):
        create_indicator(StatusConfig(backend="gpio"), gpio_loader=lambda: fake)
    assert fake.calls[-1] == ("cleanup", (17, 27))
    with caplog.at_level(logging.INFO, logger="firmware_agent.status"):
        ind = create_indicator(StatusConfig(backend="auto"), gpio_loader=lambda: fake)
    assert ind is not None and isinstance(ind.backend, MockBackend) and "using the mock" in caplog.text
    ind.close()


def test_real_rpi_gpio_drives_the_led() -> None:
    try:
        gpio = import_gpio()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"RPi.GPIO cannot be imported on this machine ({type(exc).__name__}: {exc}); needs a Pi")
    ind = create_indicator(StatusConfig(backend="gpio"))
    assert ind is not None and isinstance(ind.backend, GpioBackend)
    try:
        ind.set_state(LedState.ERROR)
        assert gpio.input(ind.backend.led_pin) == gpio.HIGH
        ind.set_state(LedState.IDLE)
        assert gpio.input(ind.backend.led_pin) == gpio.LOW
    finally:
        ind.close()


# --- wiring into the agent service ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(2, 3, 512, allow_insecure=True)


@pytest.fixture
def indicators(monkeypatch: pytest.MonkeyPatch) -> list[StatusIndicator]:
    """Every indicator ``build_agent`` creates, in order."""
    created: list[StatusIndicator] = []
    real = status_led.create_indicator

    def spy(config: StatusConfig, *args: Any, **kwargs: Any) -> StatusIndicator | None:
        ind = real(config, *args, **kwargs)
        if ind is not None:
            created.append(ind)
        return ind

    monkeypatch.setattr(service, "create_indicator", spy)
    return created


def test_build_agent_wires_the_indicator_and_the_button_reports_status(
    tmp_path: Path,
    dealt: tuple[ThresholdPublicKey, list[KeyShare]],
    indicators: list[StatusIndicator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = write_fleet(tmp_path, "status-test", *dealt, devices=3, extra_toml='[status]\nbackend = "mock"\n')
    seen: list[str] = []
    agent = service.build_agent(files.devices[0].config_path, on_event=lambda name, _data: seen.append(name))
    (ind,) = indicators
    assert isinstance(ind.backend, MockBackend)
    hook = agent._on_event  # what the agent calls for every event
    assert hook is not None
    try:
        hook("training", {"device": agent.address, "round": 4})
        assert seen == ["training"] and ind.state is LedState.TRAINING  # both hooks got it
        with caplog.at_level(logging.INFO, logger="firmware_agent.service"):
            ind.backend.press()
    finally:
        agent.close()
        hook("stopped", {"device": agent.address})
    assert f"status button: device {agent.address}, key holder 1, latest round seen 4" in caplog.text
    assert "applied round 0" in caplog.text and "LED training" in caplog.text
    assert ind.backend.closed and not ind.blinking  # "stopped" released it
    assert seen == ["training", "stopped"]


def test_build_agent_with_status_off_keeps_the_callers_hook(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]], indicators: list[StatusIndicator]
) -> None:
    files = write_fleet(tmp_path, "status-off", *dealt, devices=3, extra_toml='[status]\nbackend = "off"\n')

    def mine(name: str, data: dict[str, Any]) -> None:
        del name, data

    agent = service.build_agent(files.devices[0].config_path, on_event=mine)
    try:
        assert agent._on_event is mine and indicators == []
    finally:
        agent.close()


def test_a_failed_build_releases_the_indicator(
    tmp_path: Path, dealt: tuple[ThresholdPublicKey, list[KeyShare]], indicators: list[StatusIndicator]
) -> None:
    files = write_fleet(tmp_path, "status-fail", *dealt, devices=3, extra_toml='[status]\nbackend = "mock"\n')
    (files.devices[0].config_path.parent / "data.npz").unlink()
    with pytest.raises(AgentSetupError, match="does not exist"):
        service.build_agent(files.devices[0].config_path)
    (ind,) = indicators
    assert isinstance(ind.backend, MockBackend) and ind.backend.closed
