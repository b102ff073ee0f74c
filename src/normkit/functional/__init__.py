"""Stateless normalization ops: tensors in, tensors out. Signatures extend ``torch.nn.functional``'s."""

from .batch_norm import batch_norm
from .batch_renorm import batch_renorm
from .ghost_batch_norm import ghost_batch_norm
from .group_norm import group_norm
from .instance_norm import instance_norm
from .layer_norm import layer_norm

__all__ = ["batch_norm", "batch_renorm", "ghost_batch_norm", "group_norm", "instance_norm", "layer_norm"]
