"""pytest-isolate: run pytest tests hermetically inside Linux namespace containers."""

__version__ = "0.1.0"
