"""TorchScript support: ``torch.jit.script`` calls a module's ``__prepare_scriptable__`` and compiles what it returns.

normkit's forwards are Python (validation with fix-it messages, backend dispatch), which TorchScript cannot compile.
A drop-in therefore hands TorchScript its torch twin: an instance of the torch class that shares this module's
parameters, buffers and attributes (no copy), so the scripted model computes exactly what torch's layer computes and
moves the same running statistics. What a scripted model does not keep: normkit's error messages and its
``nonfinite`` policy (non-finite batches propagate into the running statistics, as in torch).
"""

from __future__ import annotations

import torch


def torch_twin(module: torch.nn.Module, torch_class: type | None = None) -> torch.nn.Module:
    """A ``torch_class`` instance (default: the first ``torch.nn`` class ``module`` derives from) sharing
    ``module``'s parameters, buffers, submodules and attributes."""
    if torch_class is None:
        torch_class = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules"))
    twin = torch_class.__new__(torch_class)
    twin.__dict__ = dict(module.__dict__)
    return twin


def not_scriptable(module: torch.nn.Module, why: str):
    """The error for layers TorchScript cannot run: what to use instead."""
    raise NotImplementedError(
        f"torch.jit.script cannot compile {type(module).__name__}: {why}. Use torch.compile or torch.export.export "
        "(both trace normkit's layers without graph breaks), or convert the model first with "
        "normkit.tools.convert(model, 'torch') where torch has an equivalent layer."
    )
