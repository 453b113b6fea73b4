"""Helpers for tests against real external programs: a Mosquitto process per test, amqtt in a thread, and a
small synchronous paho client. Fixtures built on them live in :mod:`tests.support.fixtures`."""
