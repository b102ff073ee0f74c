"""Diagnostics: a doctor for the classic batch-norm mistakes and a monitor of the statistics over training.

Nothing heavy is imported here: rich and matplotlib load inside the functions that draw.
"""

from ._doctor import RULES, doctor
from ._monitor import Monitor
from ._report import SCHEMA, Finding, Report
from ._targets import TargetError, load_model

__all__ = ["RULES", "SCHEMA", "Finding", "Monitor", "Report", "TargetError", "doctor", "load_model"]
