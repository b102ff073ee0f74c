r"""Conversions between torch's batch-norm conventions and those of Keras 3, tf.keras 2 and Flax.

The same layer has different defaults, names and update rules across libraries. Left unconverted, a Keras
momentum of 0.99 in torch keeps 99 % of every batch and forgets the running statistics almost at once. What
differs (also in ``docs/conventions.md``; read from the libraries' code and checked by running them):

| | torch / normkit | Keras 3 | tf.keras 2 | Flax (linen, nnx) |
|---|---|---|---|---|
| running update | `r = (1-m)*r + m*b` | `r = m*r + (1-m)*b` | as Keras 3 | as Keras 3 |
| default momentum | 0.1 (`None`: cumulative average) | 0.99 | 0.99 | 0.99 |
| stored variance | unbiased `n/(n-1)` (normkit: `running_var=`) | biased | biased; fused path: unbiased | biased |
| normalizing variance | biased | biased | biased | biased |
| default eps | 1e-5 | 1e-3 | 1e-3 | 1e-5 |
| scale, shift | `weight`, `bias` | `gamma`, `beta` | `gamma`, `beta` | params `scale`, `bias` |
| running statistics | `running_mean`, `running_var` | `moving_mean`, `moving_variance` | as Keras 3 | `mean`, `var` |
| step counter | `num_batches_tracked` | none | none | none |
| no γ / no β | `affine=False` / `bias=False` | `scale=False` / `center=False` | as Keras 3 | `use_scale`, `use_bias` |
| channel axis | dim 1: `(N, C, *)` | `axis=-1`: `(N, *, C)` | `axis=-1` (int or list) | `axis=-1` |
| train / eval | `.train()` / `.eval()` | call arg `training=` | as Keras 3 | `use_running_average` |
| default mode | training | inference (`training=False`) | learning phase | linen: none; nnx: training |
| frozen layer | `requires_grad_(False)`: only γ, β | `trainable=False`: inference, no update | as Keras 3 | n/a |
| 1 value per channel | `ValueError` in training | output 0, variance 0 | as Keras 3 (cuDNN: NaN) | output 0 |

``m`` is each library's own momentum, ``r`` a running statistic, ``b`` the batch's. tf.keras 2 takes its *fused*
path by default for 4D/5D inputs whose axis is 1 or 3 (4D), 1 or 4 (5D); that path stores the unbiased variance
(so use ``running_var="unbiased"`` there). tf.keras' ``trainable=False`` forces inference in V2 layers only. Flax's
``mean``/``var`` live in the ``batch_stats`` collection; linen's ``use_running_average`` has no default.

Converting a Keras layer: ``momentum = 1 - keras_momentum`` (:func:`momentum_from_keras`), ``eps=1e-3``,
``running_var="biased"``, permute ``(N, *, C)`` to ``(N, C, *)`` (or call :func:`normkit.functional.batch_norm`
with ``channel_dim=-1``), and copy the weights with :func:`load_keras_weights`; :func:`keras_batch_norm` builds
such a module. Inference then matches whatever the stored variance; continued training matches only when the
stored variance (biased or unbiased) matches too.
"""

from __future__ import annotations

import numbers

import torch

from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

_MODULES = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_IDENTITY = {"weight": 1.0, "bias": 0.0}
_KERAS_FLAG = {"weight": "scale", "bias": "center"}
_SET_BY_KERAS_BATCH_NORM = {
    "eps": "pass epsilon=... (Keras' name)",
    "affine": "pass center=... and scale=... (Keras' names)",
    "bias": "pass center=... (Keras' name)",
    "running_var": 'Keras stores the biased variance, so keras_batch_norm always uses running_var="biased"',
}


def _check_momentum(m, name: str, none_means: str) -> float:
    if m is None or isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"{name}: expected a momentum that is a number in [0, 1], got {m!r}. {none_means}")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"{name}: expected a momentum in [0, 1], got {m!r}. {none_means}")
    return float(m)


def momentum_from_keras(m: float) -> float:
    r"""The torch momentum that gives the running update of Keras' (and Flax's) momentum ``m``.

    .. math::
        \text{moving} = m \cdot \text{moving} + (1 - m) \cdot \text{batch}
        \quad\Longleftrightarrow\quad
        \text{running} = (1 - m_t) \cdot \text{running} + m_t \cdot \text{batch},\qquad m_t = 1 - m

    Args:
        m: Keras' momentum, a number in ``[0, 1]`` (Keras' default is 0.99).

    Raises:
        TypeError: ``m`` is ``None``, a bool or not a real number. ValueError: ``m`` is outside ``[0, 1]``.

    Examples::

        >>> from normkit.compat import momentum_from_keras
        >>> round(momentum_from_keras(0.99), 6)
        0.01
        >>> momentum_from_keras(0.0)
        1.0
    """
    return 1.0 - _check_momentum(
        m, "momentum_from_keras",
        "Keras' momentum is the weight of the old moving statistics, e.g. 0.99 (its default). (torch's "
        "momentum=None means a cumulative average over all batches, which Keras has no equivalent for.)",
    )


def momentum_to_keras(m: float) -> float:
    r"""The Keras (and Flax) momentum that gives the running update of torch's momentum ``m``: ``1 - m``.

    Args:
        m: torch's momentum, a number in ``[0, 1]`` (torch's default is 0.1).

    Raises:
        TypeError: ``m`` is ``None`` (torch's cumulative average, which Keras cannot express), a bool or not a real
            number. ValueError: ``m`` is outside ``[0, 1]``.

    Examples::

        >>> from normkit.compat import momentum_to_keras
        >>> momentum_to_keras(0.1)
        0.9
    """
    return 1.0 - _check_momentum(
        m, "momentum_to_keras",
        "torch's momentum=None means a cumulative average over all batches, which Keras has no equivalent for: "
        "Keras always keeps an exponential moving average. Pick a fixed torch momentum such as 0.1 (torch's "
        "default), or recalibrate the statistics in torch before exporting.",
    )


def keras_batch_norm(
    num_features: int,
    *,
    dim: int = 2,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    center: bool = True,
    scale: bool = True,
    **kw,
) -> torch.nn.Module:
    r"""A normkit ``BatchNorm{dim}d`` that computes what Keras 3's ``BatchNormalization`` computes.

    Momentum converted (``1 - momentum``), ``eps=epsilon``, ``running_var="biased"``. The module takes the channels
    at dim 1 as every torch BatchNorm does: permute Keras' ``(N, *, C)`` data to ``(N, C, *)``. Keras' missing
    scale or shift becomes what torch can express: ``center=False`` gives ``bias=False`` (no bias at all, as in
    Keras); ``scale=False`` with ``center=True`` keeps a ``weight`` (torch cannot have a bias without one) frozen
    at 1 with ``requires_grad=False``, which :func:`load_keras_weights` resets to 1 when given ``gamma=None``;
    neither gives ``affine=False``. Train/eval is torch's ``module.train()``/``.eval()`` (Keras' ``training=``).

    Args:
        num_features: the number of channels, ``C``.
        dim: 1, 2 or 3: which of ``BatchNorm1d/2d/3d`` (inputs ``(N, C)`` or ``(N, C, L)``, ``(N, C, H, W)``,
            ``(N, C, D, H, W)``). Default: ``2``.
        momentum: Keras' momentum (weight of the old moving statistics). Default: ``0.99``.
        epsilon: added to the variance inside the square root. Default: ``1e-3``.
        center, scale: Keras' flags for ``beta`` and ``gamma``. Default: ``True``.
        **kw: the module's other arguments: ``device``, ``dtype``, ``track_running_stats``, ``nonfinite``.

    Examples::

        >>> import torch
        >>> from normkit.compat import keras_batch_norm
        >>> bn = keras_batch_norm(1, dim=1)
        >>> bn.eps, round(bn.momentum, 6), bn.running_var_mode
        (0.001, 0.01, 'biased')
        >>> bn(torch.tensor([[1.0], [2.0], [3.0], [4.0]])).flatten()
        tensor([-1.3411, -0.4470,  0.4470,  1.3411], grad_fn=<ViewBackward0>)
        >>> bn.running_mean, bn.running_var
        (tensor([0.0250]), tensor([1.0025]))
    """
    for name, fix in _SET_BY_KERAS_BATCH_NORM.items():
        if name in kw:
            raise TypeError(f"keras_batch_norm: {name}= is set from the Keras arguments, got {name}={kw[name]!r}; "
                            f"{fix}.")
    if isinstance(dim, bool) or dim not in _MODULES:
        raise ValueError(f"keras_batch_norm: dim must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {dim!r}. Use dim=1 for "
                         "(N, C) or (N, C, L) inputs, dim=2 for images, dim=3 for volumes.")
    module = _MODULES[dim](num_features, eps=epsilon, momentum=momentum_from_keras(momentum),
                           affine=center or scale, bias=center, running_var="biased", **kw)
    if center and not scale:
        module.weight.requires_grad_(False)
    return module


def load_keras_weights(module: torch.nn.Module, gamma, beta, moving_mean, moving_variance) -> torch.nn.Module:
    r"""Copy a Keras ``BatchNormalization``'s weights into a torch or normkit BatchNorm, in place.

    ``gamma -> weight``, ``beta -> bias``, ``moving_mean -> running_mean``, ``moving_variance -> running_var``,
    converted to the module's dtype and device under :func:`torch.no_grad`; ``num_batches_tracked`` is left
    alone. Keras' ``layer.get_weights()`` lists them in this order. Everything is checked before anything is
    written, so a failed call leaves the module exactly as it was.

    ``gamma=None`` (Keras ``scale=False``) needs a module without ``weight`` or with a frozen one
    (``requires_grad=False``, as :func:`keras_batch_norm` builds), which is then set to 1; likewise ``beta=None``
    (``center=False``) and ``bias``, set to 0.

    Args:
        module: a BatchNorm with running statistics (``track_running_stats=True``).
        gamma, beta: Keras' ``(C,)`` scale and shift, or ``None`` when the layer had none.
        moving_mean, moving_variance: Keras' ``(C,)`` moving statistics.
            Each array may be a numpy array, a tensor, or anything :func:`torch.as_tensor` takes.

    Returns:
        ``module``, loaded.

    Raises:
        TypeError: not a BatchNorm, or an array that is not real numbers. ValueError: an array of the wrong
            length, with inf/NaN or (variance) negative values, or a ``gamma``/``beta`` that the module has no
            place for, or vice versa.

    Examples::

        >>> import numpy as np, torch
        >>> from normkit.compat import keras_batch_norm, load_keras_weights
        >>> bn = load_keras_weights(keras_batch_norm(2).eval(), np.array([2.0, 1.0]), np.zeros(2),
        ...                         np.array([1.0, 0.0]), np.array([4.0, 1.0]))
        >>> bn.weight.data, bn.running_var
        (tensor([2., 1.]), tensor([4., 1.]))
    """
    _require_batch_norm(module)
    num_features = module.running_mean.numel()
    values = {
        "weight": _affine_value(module, "weight", "gamma", gamma, num_features),
        "bias": _affine_value(module, "bias", "beta", beta, num_features),
        "running_mean": _as_per_channel("moving_mean", moving_mean, module.running_mean, num_features),
        "running_var": _as_per_channel("moving_variance", moving_variance, module.running_var, num_features),
    }
    negative = values["running_var"] < 0
    if bool(negative.any()):
        raise ValueError(
            f"load_keras_weights: moving_variance must be >= 0, got {_describe(values['running_var'], negative)}. "
            "A variance cannot be negative: check that the arrays are passed in Keras' order (gamma, beta, "
            "moving_mean, moving_variance); tiny negative values from rounding can be clipped with "
            "numpy.maximum(moving_variance, 0)."
        )
    with torch.no_grad():
        for name, value in values.items():
            if value is not None:
                target = getattr(module, name)
                target.copy_(value.to(target.device))
    return module


def _require_batch_norm(module) -> None:
    names = ("weight", "bias", "running_mean", "running_var")
    if not isinstance(module, torch.nn.Module) or not all(hasattr(module, name) for name in names):
        raise TypeError(
            "load_keras_weights: expected a batch-norm module with weight, bias, running_mean and running_var "
            f"(torch.nn.BatchNorm2d, normkit.BatchNorm2d, ...), got {type(module).__name__}. Pass the BatchNorm "
            "itself, e.g. model.get_submodule('bn1')."
        )
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"load_keras_weights: the {type(module).__name__} has no running statistics "
            "(track_running_stats=False), so Keras' moving_mean and moving_variance have nowhere to go. Build it "
            "with track_running_stats=True (e.g. normkit.compat.keras_batch_norm)."
        )
    if any(torch.nn.parameter.is_lazy(getattr(module, name)) for name in names):
        raise ValueError(
            f"load_keras_weights: the {type(module).__name__} is lazy and not initialized yet, so its number of "
            "features is unknown. Run one forward pass first, or build it with num_features=C."
        )


def _affine_value(module, name: str, keras_name: str, value, num_features: int) -> torch.Tensor | None:
    target = getattr(module, name)
    flag = _KERAS_FLAG[name]
    if value is None:
        if target is None:
            return None
        if not target.requires_grad:
            return torch.full_like(target, _IDENTITY[name], device="cpu")
        raise ValueError(
            f"load_keras_weights: {keras_name}=None (a Keras layer with {flag}=False) but the "
            f"{type(module).__name__} has a trainable {name}. Build the module without it "
            f"(normkit.compat.keras_batch_norm(..., {flag}=False)), or pass {keras_name}=numpy.full(C, "
            f"{_IDENTITY[name]}) to load Keras' implicit value and keep training it."
        )
    if target is None:
        builder = "affine=False" if name == "weight" else "bias=False"
        raise ValueError(
            f"load_keras_weights: got {keras_name} but the {type(module).__name__} has no {name} ({builder}). "
            f"Build it with the {name} (normkit.compat.keras_batch_norm(..., {flag}=True)), or pass "
            f"{keras_name}=None if the Keras layer had {flag}=False."
        )
    return _as_per_channel(keras_name, value, target, num_features)


def _as_per_channel(name: str, value, target: torch.Tensor, num_features: int) -> torch.Tensor:
    """``value`` as a ``(C,)`` CPU tensor of ``target``'s dtype, or an error that names ``name``."""
    if value is None:
        raise TypeError(f"load_keras_weights: {name} is required, got None. Pass the Keras layer's {name} array.")
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value).to("cpu")
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"load_keras_weights: {name} must be an array of numbers (numpy array, tensor, list), got "
            f"{type(value).__name__}: {error}"
        ) from None
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"load_keras_weights: {name} must hold real numbers, got dtype {t.dtype}. Pass the Keras "
                        f"layer's float array.")
    if t.numel() != num_features or sum(size != 1 for size in t.shape) > 1:
        raise ValueError(
            f"load_keras_weights: {name} must hold num_features={num_features} values (shape ({num_features},)), "
            f"got {t.numel()} (shape {tuple(t.shape)}). Build the module with the Keras layer's number of channels "
            "(the size of its axis), or pass that layer's arrays."
        )
    t = t.reshape(num_features)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise ValueError(f"load_keras_weights: {name} must be finite, got {_describe(t, bad)}. The Keras layer's "
                         "weights are broken (diverged training?): fix or re-initialize them first.")
    converted = t.to(target.dtype)
    overflow = ~torch.isfinite(converted)
    if bool(overflow.any()):
        raise ValueError(
            f"load_keras_weights: {name} does not fit the module's {target.dtype}, got {_describe(t, overflow)}. "
            "Convert the module to float32 first (module.float())."
        )
    return converted


def _describe(values: torch.Tensor, where: torch.Tensor) -> str:
    channels = where.nonzero().flatten().tolist()
    shown = ", ".join(f"{values[c].item():.7g} at channel {c}" for c in channels[:4])
    return shown + (f" and {len(channels) - 4} more" if len(channels) > 4 else "")


__all__ = ["keras_batch_norm", "load_keras_weights", "momentum_from_keras", "momentum_to_keras"]
