"""Status LED and push button of a device (RPi.GPIO on a Raspberry Pi, a logging mock elsewhere).

A headless device has one way to say what it is doing and one way to be asked: an LED that is off while the
agent waits (idle), blinks while it trains, and stays on after an error until the agent recovers; and a
button whose press logs the agent's status and asks it to take part in the next round.

Backends (``[status] backend`` in agent.toml, :class:`~blockdeepnet.config.StatusConfig`):

- ``gpio``: RPi.GPIO in BCM numbering; the LED on an output pin (active high), the button between its pin
  and ground, read with the internal pull-up, so a press is a falling edge (debounced in RPi.GPIO).
- ``mock``: no hardware; logs every state change and remembers the LED level, and :meth:`MockBackend.press`
  stands in for the button (tests, demos, a laptop).
- ``auto``: ``gpio`` when RPi.GPIO imports and the pins can be set up, else ``mock`` (logged either way).
- ``off``: no indicator at all (:func:`create_indicator` returns None).

Events come from the agent's event hook (``on_event(name, data)``, see
:data:`firmware_agent.agent.EventHook`), on the agent's worker thread or its MQTT thread, and the button
callback runs on RPi.GPIO's own thread: the indicator serialises state changes with a lock, and blinking runs
on a small thread of its own that exists only while the state is ``training``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final, Protocol

from blockdeepnet.config import StatusConfig
from firmware_agent.errors import AgentSetupError

__all__ = [
    "Backend",
    "GpioBackend",
    "LedState",
    "MockBackend",
    "StatusError",
    "StatusIndicator",
    "create_indicator",
    "import_gpio",
]

logger = logging.getLogger("firmware_agent.status")

BLINK_INTERVAL_S: Final = 0.5  # half a period: 1 Hz blinking
DEBOUNCE_MS: Final = 200  # a press bounces for a few ms; 200 ms also swallows an accidental double press


class LedState(enum.StrEnum):
    """What the LED shows: ``idle`` off, ``training`` blinking, ``error`` solid on."""

    IDLE = "idle"
    TRAINING = "training"
    ERROR = "error"


class StatusError(AgentSetupError):
    """``backend = "gpio"`` was asked for but the GPIO pins cannot be used (reported before the agent runs)."""


class Backend(Protocol):
    """The hardware side: drive the LED, report button presses."""

    name: str

    def set_led(self, on: bool) -> None:
        """Switch the LED on or off (called by the blink thread too, so it must be quick)."""

    def show(self, state: LedState) -> None:
        """Told once per state change, before the LED follows it (the mock logs it; the hardware ignores it)."""

    def watch_button(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on any thread) for every press."""

    def close(self) -> None:
        """Switch the LED off and release the pins."""


class MockBackend:
    """No hardware: logs state changes, remembers the LED level and counts toggles; ``press()`` is the button."""

    name = "mock"

    def __init__(self) -> None:
        self.led_on = False
        self.toggles = 0
        self.states: list[LedState] = []
        self.closed = False
        self._callback: Callable[[], None] | None = None

    def set_led(self, on: bool) -> None:
        if on != self.led_on:
            self.toggles += 1
        self.led_on = on

    def show(self, state: LedState) -> None:
        self.states.append(state)
        logger.info("status LED (mock): %s", _DESCRIPTIONS[state])

    def watch_button(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def press(self) -> None:
        """Simulate one press of the button (runs the callback on the caller's thread)."""
        logger.info("status button (mock): pressed")
        if self._callback is not None:
            self._callback()

    def close(self) -> None:
        self.set_led(False)
        self.closed = True


def import_gpio() -> ModuleType:
    """``RPi.GPIO``; raises ImportError, or RuntimeError when it is installed but not on a Raspberry Pi."""
    import RPi.GPIO as gpio  # type: ignore[import-not-found,import-untyped,unused-ignore]

    return gpio  # type: ignore[no-any-return,unused-ignore]


class GpioBackend:
    """RPi.GPIO: LED on ``led_pin`` (output, active high), button on ``button_pin`` (input, pull-up, to ground).

    ``gpio`` is the RPi.GPIO module, passed in so the pin wiring can be checked against a stand-in.
    """

    name = "gpio"

    def __init__(
        self, gpio: ModuleType, led_pin: int, button_pin: int, *, debounce_ms: int = DEBOUNCE_MS
    ) -> None:
        if led_pin == button_pin:
            raise StatusError(f"status.led_pin and status.button_pin are both BCM {led_pin}")
        self._gpio = gpio
        self.led_pin = led_pin
        self.button_pin = button_pin
        self._callback: Callable[[], None] | None = None
        # All pin set-up happens here, so that create_indicator sees every hardware failure in one place.
        gpio.setwarnings(False)  # pins left configured by a previous, killed run are expected, not a problem
        gpio.setmode(gpio.BCM)
        gpio.setup(led_pin, gpio.OUT, initial=gpio.LOW)
        gpio.setup(button_pin, gpio.IN, pull_up_down=gpio.PUD_UP)
        try:
            gpio.add_event_detect(button_pin, gpio.FALLING, callback=self._edge, bouncetime=debounce_ms)
        except BaseException:
            gpio.cleanup((led_pin, button_pin))
            raise

    def set_led(self, on: bool) -> None:
        self._gpio.output(self.led_pin, self._gpio.HIGH if on else self._gpio.LOW)

    def show(self, state: LedState) -> None:
        logger.debug("status LED: %s", _DESCRIPTIONS[state])

    def watch_button(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def _edge(self, _channel: int) -> None:
        """RPi.GPIO's callback, on its event thread, for a debounced falling edge: a press."""
        if self._callback is not None:
            self._callback()

    def close(self) -> None:
        self._gpio.remove_event_detect(self.button_pin)
        self._gpio.output(self.led_pin, self._gpio.LOW)
        self._gpio.cleanup((self.led_pin, self.button_pin))


_DESCRIPTIONS: Final = {
    LedState.IDLE: "idle (off)",
    LedState.TRAINING: "training (blinking)",
    LedState.ERROR: "error (solid on)",
}

# Agent events that set a state by themselves. ``training`` starts blinking; the round's end (trained) or a
# newly applied model means idle; anything that keeps the device from contributing is an error.
_EVENT_STATES: Final = {
    "training": LedState.TRAINING,
    "trained": LedState.IDLE,
    "applied": LedState.IDLE,
    "error": LedState.ERROR,
    "overflow": LedState.ERROR,
    "publish_gave_up": LedState.ERROR,
    "connect_failed": LedState.ERROR,
    "stopped": LedState.IDLE,
}
# paho's reason for a disconnect the agent asked for (shutting down): not an error.
_CLEAN_DISCONNECT: Final = frozenset({"Success", "Normal disconnection"})


class StatusIndicator:
    """Drives a :class:`Backend` from the agent's events; calls ``on_press`` when the button is pressed.

    Use :meth:`on_event` as (part of) the agent's event hook. :meth:`close` stops the blink thread, switches
    the LED off and releases the pins; it runs by itself on the agent's ``stopped`` event.
    """

    def __init__(
        self,
        backend: Backend,
        on_press: Callable[[], None] | None = None,
        *,
        blink_interval_s: float = BLINK_INTERVAL_S,
    ) -> None:
        self.backend = backend
        self.on_press = on_press
        self.blink_interval_s = blink_interval_s
        self.last_round: int | None = None
        self.presses = 0
        self._state = LedState.IDLE
        self._lock = threading.Lock()
        self._blink_stop = threading.Event()
        self._blinker: threading.Thread | None = None
        self._closed = False
        backend.set_led(False)
        backend.watch_button(self._pressed)

    @property
    def state(self) -> LedState:
        return self._state

    @property
    def blinking(self) -> bool:
        """True while the blink thread is alive (only in the ``training`` state)."""
        return self._blinker is not None and self._blinker.is_alive()

    def set_state(self, state: LedState) -> None:
        """Show ``state``; a no-op when it is already shown or after :meth:`close`."""
        with self._lock:
            if self._closed or state == self._state:
                return
            self._stop_blinking()
            self._state = state
            self.backend.show(state)
            if state is LedState.TRAINING:
                self._start_blinking()
            else:
                self.backend.set_led(state is LedState.ERROR)

    def on_event(self, name: str, data: dict[str, Any]) -> None:
        """The agent's event hook: remembers the latest round and maps the event to an LED state.

        A ``receipt`` that refuses the update is an error, and so is losing the broker (not a disconnect the
        agent asked for); ``connected`` clears an error (the outage that most likely caused it is over) but
        does not interrupt blinking; events not listed in ``_EVENT_STATES`` leave the LED as it is.
        """
        round_no = data.get("round")
        if isinstance(round_no, int) and not isinstance(round_no, bool):
            self.last_round = max(round_no, self.last_round or 0)
        if name == "receipt":
            if not data.get("accepted", True):
                self.set_state(LedState.ERROR)
        elif name == "disconnected":
            if str(data.get("reason", "")) not in _CLEAN_DISCONNECT:
                self.set_state(LedState.ERROR)
        elif name == "connected":
            if self._state is LedState.ERROR:
                self.set_state(LedState.IDLE)
        elif name in _EVENT_STATES:
            self.set_state(_EVENT_STATES[name])
        if name == "stopped":
            self.close()

    def close(self) -> None:
        """Stop blinking, LED off, release the hardware. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_blinking()
            self.backend.close()

    def _pressed(self) -> None:
        self.presses += 1
        if self.on_press is None:
            return
        try:
            self.on_press()
        except Exception:  # on RPi.GPIO's thread an exception would only print a traceback and be lost
            logger.exception("status button handler failed")

    def _start_blinking(self) -> None:
        self._blink_stop.clear()
        self._blinker = threading.Thread(target=self._blink, name="bdn-status-blink", daemon=True)
        self._blinker.start()

    def _stop_blinking(self) -> None:
        """Called with the lock held; the blink thread never takes it, so joining cannot deadlock."""
        if self._blinker is None:
            return
        self._blink_stop.set()
        self._blinker.join()
        self._blinker = None

    def _blink(self) -> None:
        on = True
        self.backend.set_led(on)
        while not self._blink_stop.wait(self.blink_interval_s):
            on = not on
            self.backend.set_led(on)


def create_indicator(
    config: StatusConfig,
    on_press: Callable[[], None] | None = None,
    *,
    gpio_loader: Callable[[], ModuleType] = import_gpio,
) -> StatusIndicator | None:
    """The indicator ``config`` asks for, or None for ``backend = "off"``.

    ``gpio`` failing to import or to set up its pins raises :class:`StatusError`; ``auto`` falls back to the
    mock and logs why. ``gpio_loader`` imports RPi.GPIO (replaceable so both paths can be tested off a Pi).
    """
    if config.backend == "off":
        return None
    if config.backend == "mock":
        return StatusIndicator(MockBackend(), on_press)
    if config.backend not in ("gpio", "auto"):
        raise StatusError(f"status.backend must be auto, gpio, mock or off, got {config.backend!r}")
    try:
        gpio = gpio_loader()
        backend: Backend = GpioBackend(gpio, config.led_pin, config.button_pin)
    except StatusError:
        raise
    except (ImportError, RuntimeError, OSError, ValueError) as exc:
        # ImportError: not installed; RuntimeError: installed but not on a Pi, or no access to /dev/gpiomem.
        reason = f"{type(exc).__name__}: {exc}"
        if config.backend == "gpio":
            raise StatusError(
                f"status.backend is 'gpio' but RPi.GPIO cannot drive the pins ({reason}); install it "
                "(apt install python3-rpi.gpio, or pip install RPi.GPIO), run on a Raspberry Pi as a user in "
                "group gpio, or set status.backend to auto or mock"
            ) from None
        logger.info("status LED/button: RPi.GPIO not usable (%s); using the mock backend", reason)
        backend = MockBackend()
    else:
        logger.info(
            "status LED/button: RPi.GPIO, LED on BCM %d, button on BCM %d", config.led_pin, config.button_pin
        )
    return StatusIndicator(backend, on_press)
