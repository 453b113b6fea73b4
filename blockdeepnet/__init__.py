"""BlockDeepNet shared core: crypto, learning, data, wire formats. Pure: no broker, database or daemon code."""

__version__ = "0.1.0"
