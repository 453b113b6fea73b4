"""Shared test configuration: every test that spawns processes or waits is bounded by pytest-timeout
(pyproject sets the default); slow tests set their own tighter limit."""
