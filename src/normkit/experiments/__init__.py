"""The reproducible experiments behind ``normkit demo``: plain data out, printing left to the CLI."""

from .demo import conclusion, run_demo

__all__ = ["conclusion", "run_demo"]
