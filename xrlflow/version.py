"""The package version (the report records it)."""

__version__ = "0.1.0"
