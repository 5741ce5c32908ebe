"""The library's version (written into every adapter folder); pyproject.toml holds the same number."""

__version__ = "0.1.0"
