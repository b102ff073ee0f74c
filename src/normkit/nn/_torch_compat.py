"""The torch releases normkit supports (README, "Supported versions"), made to look alike where they differ.

torch 2.12 added the keyword-only ``bias=`` to ``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` and
``GroupNorm`` (``bias=False``: no shift; ``affine=True`` still learns the scale). normkit's drop-ins take
``bias=`` on every supported torch: :func:`with_bias` puts, on torch 2.11, a small class between normkit's class and
torch's that accepts it and builds what later torch builds (the ``bias`` parameter registered as ``None``), and that
keeps ``reset_parameters`` and the repr working without it. On torch 2.12 and later it returns torch's class, so
nothing changes there.

No torch privates are touched (DESIGN.md §2.9): the 2.11 class relies on torch 2.11's ``__init__`` calling
``reset_parameters`` while the bias still exists; tests/test_torch_versions.py checks the result on every leg.
"""

from __future__ import annotations

import functools
import inspect

import torch


def accepts_bias(torch_class: type) -> bool:
    """Whether ``torch_class(...)`` takes the ``bias=`` keyword (torch 2.12+, and every normkit class).

    Args:
        torch_class: a ``torch.nn.Module`` subclass.

    Returns:
        ``True`` when its ``__init__`` has a ``bias`` parameter.

    Examples::

        >>> import torch
        >>> accepts_bias(torch.nn.LayerNorm)  # LayerNorm has had it since torch 2.1
        True
    """
    return "bias" in inspect.signature(torch_class.__init__).parameters


def build(cls: type, *args, bias: bool = True, **kwargs) -> torch.nn.Module:
    """``cls(*args, bias=bias, **kwargs)``, also where ``cls`` is torch 2.11's (no ``bias=``): built, then its bias
    removed when ``bias=False`` (the parameter registered as ``None``, as torch 2.12's ``bias=False`` does).

    A torch 2.11 layer built so runs and saves like torch 2.12's; only its own ``reset_parameters()`` fails (torch
    2.11 zeros the bias it assumes), which is why normkit's drop-ins derive from :func:`with_bias` instead.

    Args:
        cls: the layer's class: torch's or normkit's.
        *args: its positional arguments.
        bias: whether the layer gets a bias. Default: ``True``.
        **kwargs: its other keyword arguments.

    Returns:
        The new layer.

    Examples::

        >>> import torch
        >>> from normkit.nn._torch_compat import build
        >>> build(torch.nn.BatchNorm1d, 4, bias=False).bias is None
        True
    """
    if accepts_bias(cls):
        return cls(*args, bias=bias, **kwargs)
    module = cls(*args, **kwargs)
    if not bias:
        module.register_parameter("bias", None)
    return module


@functools.cache
def with_bias(torch_class: type) -> type:
    """``torch_class`` if it takes ``bias=``; else a subclass of it that does, as torch 2.12 and later do.

    Args:
        torch_class: one of torch's norm layers (``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*``,
            ``GroupNorm``, ...), to subclass.

    Returns:
        A class to derive normkit's drop-in from (the same class for the same argument).

    Examples::

        >>> import torch
        >>> from normkit.nn._torch_compat import with_bias
        >>> with_bias(torch.nn.LayerNorm) is torch.nn.LayerNorm
        True
        >>> layer = with_bias(torch.nn.GroupNorm)(2, 4, bias=False)
        >>> layer.bias is None, isinstance(layer, torch.nn.GroupNorm)
        (True, True)
    """
    if accepts_bias(torch_class):
        return torch_class
    name = torch_class.__name__
    return type(name, (_BiasBackport, torch_class), {"__module__": __name__, "__qualname__": f"with_bias({name})"})


class _BiasBackport:
    """torch 2.12's ``bias=`` on a torch 2.11 norm layer: built with a bias, which ``bias=False`` then removes."""

    def __init__(self, *args, bias: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not bias:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.bias is not None or not self.affine:
            super().reset_parameters()
            return
        # torch 2.11 zeros self.bias unconditionally; what torch 2.12 does without one:
        if hasattr(self, "reset_running_stats"):
            self.reset_running_stats()
        torch.nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.affine and self.bias is None:  # where torch 2.12 writes it
            text = text.replace("affine=True", "affine=True, bias=False", 1)
        return text
