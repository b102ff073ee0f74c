"""``snapshot(t)``: a copy of a buffer that a compiled backward saves instead of re-reading.

torch.compile (AOTAutograd's partitioner, torch 2.13 and earlier) may recompute in the backward a value that the
forward read from a buffer, and it re-reads the buffer there, after this forward's own update overwrote it: silently
wrong gradients (pytorch/pytorch PR 197039, open). Layers whose gradient depends on their running statistics
(batch renorm's r and d, streaming batch norm's old statistics) read them through ``snapshot``: eagerly a plain copy,
traced an opaque custom op that the partitioner never recomputes.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("normkit::snapshot", mutates_args=())
def _snapshot_op(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


@_snapshot_op.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def snapshot(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of ``t`` (detached, in ``dtype``) that stays what it was when the forward read it."""
    t = t.detach()
    copy = _snapshot_op(t) if torch.compiler.is_compiling() else t.clone()
    return copy if dtype is None or dtype == copy.dtype else copy.to(dtype)
