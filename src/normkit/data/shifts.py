"""Shifted target domains for adaptation experiments: contrast, offset, noise and small rotations."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .digits import Split

SHIFTS = ("contrast", "offset", "noise", "rotation")

_EXAMPLES = {"contrast": "0.5", "offset": "0.3", "noise": "0.1", "rotation": "15.0"}


def _check_strength(kind: str, strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(
            f"Expected strength to be a finite number for shift {kind!r}, got {strength!r}. "
            f"Pass e.g. strength={_EXAMPLES[kind]}."
        )
    if kind == "contrast" and strength <= 0:
        raise ValueError(
            f"Expected a positive contrast factor (1 leaves x unchanged), got {strength!r}. Pass e.g. strength=0.5."
        )
    if kind == "noise" and strength < 0:
        raise ValueError(
            f"Expected a noise standard deviation >= 0, got {strength!r}. Pass e.g. strength=0.1."
        )
    return float(strength)


def _rotate(x: torch.Tensor, degrees: float, image_shape) -> torch.Tensor:
    if image_shape is None:
        raise ValueError(
            "Expected image_shape for shift 'rotation' (the examples are flattened images), got None. "
            "Pass e.g. image_shape=(8, 8) for the digits; 1-D data such as MNIST-1D has no rotation."
        )
    shape = tuple(image_shape)
    if len(shape) != 2 or math.prod(shape) != x.shape[1]:
        raise ValueError(
            f"Expected image_shape (H, W) with H * W == {x.shape[1]} features, got {image_shape!r}. "
            "Pass e.g. image_shape=(8, 8) for 64 features."
        )
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # grid_sample reads the output pixel at (u, v) from the input at theta @ (u, v, 1): the inverse rotation, with
    # v pointing down the image, so that positive degrees turn the image counter-clockwise as displayed.
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    images = x.reshape(len(x), 1, *shape)
    grid = torch.nn.functional.affine_grid(theta.expand(len(x), 2, 3), list(images.shape), align_corners=False)
    rotated = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.reshape(x.shape)


def shift(x: torch.Tensor, kind: str, strength: float, *, seed: int = 0, image_shape=None) -> torch.Tensor:
    r"""A shifted copy of the examples ``x``: one of the target domains of :data:`SHIFTS`.

    .. math::
        \text{contrast: } x' = \bar x + s\,(x - \bar x), \quad
        \text{offset: } x' = x + s, \quad
        \text{noise: } x' = x + s\,\varepsilon,\ \varepsilon \sim \mathcal{N}(0, 1)

    where :math:`\bar x` is each example's own mean over its features (so contrast keeps every example's mean
    brightness and scales its deviations by :math:`s`). ``"rotation"`` turns every example, seen as an image of
    ``image_shape``, by ``strength`` degrees counter-clockwise about the image centre, bilinear interpolation via
    :func:`torch.nn.functional.grid_sample`, zeros outside the image (the digits' background). Nothing is clipped:
    values may leave the input's range, which is the point of a shifted domain.

    Args:
        x: ``(N, D)`` floating-point examples.
        kind: one of ``"contrast"``, ``"offset"``, ``"noise"``, ``"rotation"``.
        strength: the factor :math:`s > 0` (contrast, 1 = unchanged), the constant (offset), the standard deviation
            :math:`\ge 0` (noise) or the angle in degrees (rotation).
        seed: seed of the noise (default 0); the same seed gives the same noise. Ignored by the other kinds.
        image_shape: ``(H, W)`` with ``H * W == D``; required by ``"rotation"`` only.

    Shape:
        - Input: :math:`(N, D)`. Output: same shape, dtype and device; ``x`` itself is not modified.

    Examples:
        >>> x = torch.tensor([[0.0, 1.0], [1.0, 3.0]])
        >>> shift(x, "contrast", 0.5)
        tensor([[0.2500, 0.7500],
                [1.5000, 2.5000]])
        >>> shift(x, "offset", -1.0)
        tensor([[-1.,  0.],
                [ 0.,  2.]])
    """
    if kind not in SHIFTS:
        raise ValueError(f"Expected kind to be one of {SHIFTS}, got {kind!r}. Pass e.g. kind='contrast'.")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"Expected x to be a floating-point (N, D) tensor, got {got}. Pass e.g. split.x_test.")
    strength = _check_strength(kind, strength)
    if kind == "contrast":
        mean = x.mean(dim=1, keepdim=True)
        return mean + strength * (x - mean)
    if kind == "offset":
        return x + strength
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return x + strength * noise.to(x.device)
    return _rotate(x, strength, image_shape)


def shifted(split: Split, kind: str, strength: float, *, seed: int = 0) -> Split:
    """The split with both parts shifted by :func:`shift` (labels unchanged): a target domain for adaptation.

    Rotation uses ``split.image_shape``. The noise of the training part is drawn with ``seed`` and that of the test
    part with ``seed + 1``, so the two parts never share a noise pattern.

    Args:
        split: the source domain.
        kind: one of :data:`SHIFTS`.
        strength: see :func:`shift`.
        seed: seed of the noise (default 0).

    Returns:
        A new :class:`Split` with the same labels and ``image_shape``.

    Examples:
        >>> from normkit.data import load_digits
        >>> target = shifted(load_digits(), "rotation", 15.0)
        >>> tuple(target.x_test.shape), target.image_shape
        ((450, 64), (8, 8))
    """
    return replace(
        split,
        x_train=shift(split.x_train, kind, strength, seed=seed, image_shape=split.image_shape),
        x_test=shift(split.x_test, kind, strength, seed=seed + 1, image_shape=split.image_shape),
    )
