"""Offline datasets: nothing here touches the network."""

from .digits import Split, load_digits

__all__ = ["Split", "load_digits"]
