"""Canonical views of an ``(..., C, ...)`` tensor that make per-channel reductions contiguous.

``rows``: an ``(M, C)`` matrix with the channels innermost (channels_last images, ``(N, C)`` batches, ``(N, L, C)``
sequences with ``channel_dim=-1``). ``planes``: a ``(P, C, S)`` block whose last dimension is contiguous (NCHW and
friends). Both are views when the input's strides allow it; anything else is copied once into ``planes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    kind: str  # "rows" | "planes"
    channel: int
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return self.shape[self.channel]

    @property
    def count(self) -> int:
        """Values per channel."""
        return math.prod(self.shape) // max(self.channels, 1)

    @property
    def channels_last(self) -> bool:
        return self.channel == len(self.shape) - 1

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the input, any strides) in this layout's canonical form; copies only if it must."""
        if self.kind == "rows":
            moved = t if self.channels_last else t.movedim(self.channel, -1)
            return moved.contiguous().view(-1, self.channels)
        before = math.prod(self.shape[: self.channel])
        return t.contiguous().view(before, self.channels, -1)

    def restore(self, canonical: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`view`: a tensor of the input's shape (channels_last stays channels_last)."""
        if self.kind == "planes" or self.channels_last:
            return canonical.view(self.shape)
        moved = [s for d, s in enumerate(self.shape) if d != self.channel] + [self.channels]
        return canonical.view(moved).movedim(-1, self.channel)


def layout_of(x: torch.Tensor, channel: int) -> Layout:
    """``rows`` when the channels are innermost in memory, else ``planes`` (a copy if ``x`` is not contiguous)."""
    if channel == x.dim() - 1:
        kind = "rows"
    elif x.is_contiguous():
        kind = "planes"
    else:
        kind = "rows" if x.movedim(channel, -1).is_contiguous() else "planes"
    return Layout(kind, channel, tuple(x.shape))


def _strides_like_channels_last(sizes: tuple[int, ...], strides: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """torch's ``is_channels_last_strides_{2d,3d}``: whether the strides rank the channels innermost."""
    smallest = 0
    if strides[1] == 0:  # a broadcast channel dimension: ambiguous, torch defaults to the contiguous format
        return False
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def suggest_memory_format(x: torch.Tensor) -> torch.memory_format:
    """torch's ``Tensor.suggest_memory_format()`` (not exposed in Python): channels_last (3d) when a 4D (5D)
    tensor's strides put the channels innermost, else the contiguous format. torch's CPU batch and group norm
    allocate their output in this format, and so does every normkit backend."""
    if x.dim() == 4 and not x.is_contiguous():
        if x.is_contiguous(memory_format=torch.channels_last) or _strides_like_channels_last(
                tuple(x.shape), x.stride(), (1, 3, 2, 0)):
            return torch.channels_last
    elif x.dim() == 5 and not x.is_contiguous():
        if x.is_contiguous(memory_format=torch.channels_last_3d) or _strides_like_channels_last(
                tuple(x.shape), x.stride(), (1, 4, 3, 2, 0)):
            return torch.channels_last_3d
    return torch.contiguous_format


def in_torch_format(x: torch.Tensor) -> torch.Tensor:
    """``x`` dense in its suggested memory format (a copy only if it is not already): what torch's batch and group
    norm compute on, so that every backend produces torch's output strides (sliced, transposed and expanded
    inputs give a contiguous output; channels_last stays channels_last)."""
    if x.is_contiguous():
        return x
    memory_format = suggest_memory_format(x)
    return x if x.is_contiguous(memory_format=memory_format) else x.contiguous(memory_format=memory_format)


def gradient_in_torch_format(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a view of it) whose gradient arrives in ``x``'s memory format, as torch's batch and group norm give
    it, whatever the layout of the gradient flowing back. For backends built from elementwise ops, whose input
    gradient would otherwise follow the upstream gradient's layout."""
    if not x.requires_grad or not torch.is_grad_enabled():
        return x
    memory_format = suggest_memory_format(x)
    view = x.view_as(x)
    view.register_hook(lambda g: g if g.is_contiguous(memory_format=memory_format)
                       else g.contiguous(memory_format=memory_format))
    return view
