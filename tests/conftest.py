"""Shared test configuration: every test that spawns processes or waits is bounded by pytest-timeout
(pyproject sets the default); slow tests set their own tighter limit.

Shared fixtures: throw-away PostgreSQL databases (``pg_database``) and private Mosquitto brokers
(``mosquitto``, ``mosquitto_factory``)."""

pytest_plugins = ["tests.support.postgres", "tests.support.fixtures", "tests.support.swtpm"]
