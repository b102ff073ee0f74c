"""Stateless normalization ops: tensors in, tensors out. Signatures extend ``torch.nn.functional``'s."""

from .batch_norm import batch_norm

__all__ = ["batch_norm"]
