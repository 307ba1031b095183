"""The version of neat_fx (its own module, so that writers can record it without importing the package root)."""

__version__ = "0.1.0"
