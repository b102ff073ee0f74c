"""``FrozenBatchNorm1d/2d/3d``: batch normalization with fixed statistics and affine, buffers only."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ..functional import _checks
from ._scripting import torch_twin
from ._state_loading import AtomicStateLoading
from ._torch_compat import build

_STATE = ("running_mean", "running_var", "weight", "bias")  # torch's order of the per-channel checks


class FrozenBatchNorm(AtomicStateLoading, torch.nn.Module):
    r"""Batch normalization with fixed statistics and affine parameters, for inputs :math:`(N, C, +)` of any rank.

    .. math::
        y = x \cdot s + (\beta - \mathrm{E}[x] \cdot s), \qquad s = \frac{\gamma}{\sqrt{\mathrm{Var}[x] + \epsilon}}

    This is what :func:`normkit.tools.freeze` turns a ``SyncBatchNorm`` into (its rank is not known); use
    :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d` or :class:`FrozenBatchNorm3d` otherwise. The layer has
    no parameters: ``weight`` (:math:`\gamma`), ``bias`` (:math:`\beta`), ``running_mean`` and ``running_var``
    are buffers, so neither an optimizer nor ``model.train()`` can change them, and its output is that of a
    batch norm in ``eval()``. The state_dict has a batch norm's keys: any batch norm's state_dict loads (strict),
    with ``num_batches_tracked`` kept only to be restored by :func:`normkit.tools.unfreeze`, and the state_dict
    of torchvision's or detectron2's ``FrozenBatchNorm2d`` (no ``num_batches_tracked``) loads too; a state_dict
    without ``weight``/``bias`` (a batch norm with ``affine=False``) loads as :math:`\gamma = 1, \beta = 0`.

    Nothing is updated, so there is no momentum; ``running_var`` is used as stored, whichever variance the source
    kept (torch's unbiased one, or the biased one of ``running_var="biased"``, Keras and Flax).

    A new layer is exactly the identity: ``running_var`` starts at ``1 - eps`` (detectron2's choice; torchvision's
    ``1`` gives :math:`x / \sqrt{1 + \epsilon}`). The output is computed with standard ops (a multiply and an
    add), so it traces, compiles and exports; a float16/bfloat16 input is computed against the float32 statistics
    and the output has the input's dtype.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: added to the variance inside the square root. Default: ``1e-5``
        device, dtype: of the buffers (``num_batches_tracked`` is always ``torch.long``).

    Shape:
        - Input: :math:`(N, C, +)`. Output: same shape, dtype and memory format as the input.

    Examples::

        >>> import torch, normkit
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> frozen = normkit.nn.FrozenBatchNorm.from_batch_norm(bn)
        >>> frozen
        FrozenBatchNorm1d(3, eps=1e-05)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(frozen(x), bn(x))
        True
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int (the channel count C of an (N, C, *) "
                f"input), got {num_features!r}."
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{type(self).__name__}: eps must be a non-negative number such as 1e-5, got {eps!r}.")
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.full((num_features,), 1.0 - eps, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _checks.require_tensor(input, type(self).__name__)
        self._check_input_dim(input)
        _checks.require_floating(input, type(self).__name__)
        channels = input.shape[1]
        if any(getattr(self, name).numel() != channels for name in _STATE):
            for name in _STATE:
                _checks.require_per_channel(name, getattr(self, name), channels, input)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (input.dim() - 2)
        output = input * scale.reshape(shape) + shift.reshape(shape)
        return output if output.dtype == input.dtype else output.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For ``torch.jit.script``: the same layer (shared buffers) with a forward TorchScript compiles; it keeps
        the values and drops only the fix-it validation."""
        return torch_twin(self, _ScriptableFrozenBatchNorm)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        has_statistics = prefix + "running_mean" in state_dict and prefix + "running_var" in state_dict
        defaults = {"num_batches_tracked": lambda: self.num_batches_tracked}
        if has_statistics:  # a batch norm with affine=False (or bias=False): gamma = 1, beta = 0
            defaults["weight"] = lambda: torch.ones_like(self.weight)
            defaults["bias"] = lambda: torch.zeros_like(self.bias)
        for name, default in defaults.items():
            if prefix + name not in state_dict:
                state_dict[prefix + name] = default()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.Module) -> FrozenBatchNorm:
        r"""A frozen copy of the batch norm ``bn``: its ``eval()`` output, with detached copies of its state.

        ``weight``/``bias`` (1 and 0 without them) and ``running_mean``/``running_var``/``num_batches_tracked`` are
        cloned, so ``bn`` and the new layer share nothing; ``training`` is copied. ``bn``'s class, ``momentum``,
        ``affine``, ``bias``, ``track_running_stats``, the ``requires_grad`` of its parameters and normkit's
        options are remembered in the plain attribute ``_unfrozen_config`` for :meth:`to_batch_norm` (and
        :func:`normkit.tools.unfreeze`). Called on :class:`FrozenBatchNorm` it picks the rank of ``bn``
        (``BatchNorm2d`` gives :class:`FrozenBatchNorm2d`; ``SyncBatchNorm`` gives :class:`FrozenBatchNorm`).

        Args:
            bn: a batch norm (``torch.nn.modules.batchnorm._BatchNorm``: torch's or normkit's ``BatchNorm1d/2d/3d``
                or ``SyncBatchNorm``) with running statistics.

        Examples::

            >>> import torch, normkit
            >>> frozen = normkit.nn.FrozenBatchNorm2d.from_batch_norm(torch.nn.BatchNorm2d(4, momentum=0.01))
            >>> frozen, frozen._unfrozen_config["momentum"]
            (FrozenBatchNorm2d(4, eps=1e-05), 0.01)
        """
        target = _target_class(cls, bn)
        frozen = target(bn.num_features, bn.eps, device=torch.device("meta"))
        reference = bn.running_mean
        with torch.no_grad():
            frozen.weight = _clone_or(bn.weight, torch.ones_like, reference)
            frozen.bias = _clone_or(bn.bias, torch.zeros_like, reference)
            frozen.running_mean = bn.running_mean.detach().clone()
            frozen.running_var = bn.running_var.detach().clone()
            frozen.num_batches_tracked = (torch.tensor(0, dtype=torch.long, device=reference.device)
                                          if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
        frozen.training = bn.training
        frozen._unfrozen_config = _config_of(bn)
        return frozen

    def to_batch_norm(self) -> torch.nn.Module:
        r"""The trainable batch norm this layer was frozen from, with its current values.

        The class, ``momentum``, ``affine``, ``bias``, ``track_running_stats``, ``requires_grad`` flags and normkit
        options come from ``_unfrozen_config`` (set by :meth:`from_batch_norm`); a layer built directly becomes a
        normkit ``BatchNorm1d/2d/3d`` of its rank (a :class:`FrozenBatchNorm` a normkit ``SyncBatchNorm``, which
        accepts every rank) with torch's defaults. ``eps``, the values (cloned) and ``training`` are this layer's.

        Examples::

            >>> import torch, normkit
            >>> bn = normkit.nn.FrozenBatchNorm2d(4).to_batch_norm()
            >>> type(bn).__module__, bn.momentum, bn.weight.requires_grad
            ('normkit.nn.batchnorm', 0.1, True)
        """
        config = getattr(self, "_unfrozen_config", None) or _default_config(self)
        return _unfreeze(self, config)


class _ScriptableFrozenBatchNorm(FrozenBatchNorm):
    """What ``torch.jit.script`` compiles for a frozen batch norm: the same arithmetic, torch's errors only."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        shape = [1, -1] + [1] * (input.dim() - 2)
        return (input * scale.reshape(shape) + shift.reshape(shape)).to(input.dtype)


def _make(rank: int, expected: str, example: str) -> type:
    dims = {1: (2, 3), 2: (4,), 3: (5,)}[rank]

    class Frozen(FrozenBatchNorm):
        def _check_input_dim(self, input: torch.Tensor) -> None:
            if input.dim() not in dims:
                raise ValueError(f"expected {expected} input (got {input.dim()}D input)")

    name = f"FrozenBatchNorm{rank}d"
    Frozen.__name__ = Frozen.__qualname__ = name
    Frozen.__module__ = __name__
    Frozen.__doc__ = (
        rf"""Batch normalization of a :math:`({example})` input with fixed statistics and affine, buffers only.

    .. math::
        y = x \cdot s + (\beta - \mathrm{{E}}[x] \cdot s), \qquad
        s = \frac{{\gamma}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}

    The output of a ``BatchNorm{rank}d`` in ``eval()``, unchanged by ``model.train()`` and optimizers (no
    parameters: ``weight``, ``bias``, ``running_mean``, ``running_var`` are buffers). Same state_dict keys as
    ``BatchNorm{rank}d``: any batch norm's state_dict loads and this one loads into a batch norm. A new layer is
    exactly the identity (``running_var`` starts at ``1 - eps``). Like torchvision's ``FrozenBatchNorm2d`` (same
    arguments and repr); see :class:`FrozenBatchNorm` for the details and :meth:`FrozenBatchNorm.from_batch_norm`,
    :func:`normkit.tools.freeze` to make one from a trained layer.

    Args:
        num_features: :math:`C` from an expected input of size :math:`({example})`.
        eps: added to the variance inside the square root. Default: ``1e-5``
        device, dtype: of the buffers.

    Shape:
        - Input: :math:`({example})`. Output: same shape, dtype and memory format as the input.

    Examples::

        >>> import torch, normkit
        >>> frozen = normkit.nn.{name}(4)
        >>> x = torch.randn({_EXAMPLE_SHAPES[rank]})
        >>> torch.equal(frozen(x), x)
        True
    """
    )
    return Frozen


_EXAMPLE_SHAPES = {1: "8, 4", 2: "8, 4, 5, 5", 3: "2, 4, 3, 3, 3"}

FrozenBatchNorm1d = _make(1, "2D or 3D", "N, C) or (N, C, L")
FrozenBatchNorm2d = _make(2, "4D", "N, C, H, W")
FrozenBatchNorm3d = _make(3, "5D", "N, C, D, H, W")

_BY_RANK = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}


def rank_of(module: torch.nn.Module | type) -> int | None:
    """1, 2 or 3 for a batch norm or frozen batch norm (instance or class) of a known rank; ``None`` for
    ``SyncBatchNorm`` and :class:`FrozenBatchNorm`, which take every rank."""
    cls = module if isinstance(module, type) else type(module)
    for rank, classes in ((1, (torch.nn.BatchNorm1d, FrozenBatchNorm1d)),
                          (2, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)),
                          (3, (torch.nn.BatchNorm3d, FrozenBatchNorm3d))):
        if issubclass(cls, classes):
            return rank
    return None


def _target_class(cls: type, bn: torch.nn.Module) -> type:
    if not isinstance(bn, _BatchNorm):
        raise TypeError(
            f"{cls.__name__}.from_batch_norm expects a batch norm (torch's or normkit's BatchNorm1d/2d/3d or "
            f"SyncBatchNorm), got {type(bn).__name__}."
        )
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise TypeError(
            f"{cls.__name__}.from_batch_norm: {type(bn).__name__} is not initialized yet (its number of features "
            "is unknown). Run one forward pass first."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{cls.__name__}.from_batch_norm: {type(bn).__name__}({bn.num_features}) has no running statistics "
            "(track_running_stats=False), so there is nothing to freeze: in eval it normalizes with each batch's "
            "statistics. Build it with track_running_stats=True and estimate them first "
            "(normkit.tools.recalibrate), or leave the layer out."
        )
    rank = rank_of(bn)
    if cls is FrozenBatchNorm:
        return FrozenBatchNorm if rank is None else _BY_RANK[rank]
    cls_rank = rank_of(cls)
    if rank is not None and cls_rank is not None and rank != cls_rank:
        raise ValueError(
            f"{cls.__name__}.from_batch_norm got a {type(bn).__name__}: the ranks differ. Use "
            f"FrozenBatchNorm{rank}d.from_batch_norm, or FrozenBatchNorm.from_batch_norm, which picks the rank."
        )
    return cls


def _clone_or(t: torch.Tensor | None, make, like: torch.Tensor) -> torch.Tensor:
    return make(like) if t is None else t.detach().clone()


def _config_of(bn: _BatchNorm) -> dict:
    config = {
        "cls": type(bn),
        "momentum": bn.momentum,
        "affine": bn.affine,
        "bias": bn.bias is not None,
        "track_running_stats": bn.track_running_stats,
        "requires_grad": tuple(p.requires_grad for p in (bn.weight, bn.bias) if p is not None),
        "options": {},
    }
    for option, attribute in (("running_var", "running_var_mode"), ("nonfinite", "nonfinite")):
        if hasattr(bn, attribute):
            config["options"][option] = getattr(bn, attribute)
    if isinstance(bn, torch.nn.SyncBatchNorm):
        config["options"]["process_group"] = bn.process_group
    if hasattr(bn, "_sync_tag"):
        config["sync_state"] = (bn._sync_tag, bn._sync_name)
    if hasattr(bn, "qconfig"):
        config["qconfig"] = bn.qconfig
    return config


def _default_config(frozen: FrozenBatchNorm) -> dict:
    from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from .syncbatchnorm import SyncBatchNorm

    cls = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d, None: SyncBatchNorm}[rank_of(frozen)]
    return {"cls": cls, "momentum": 0.1, "affine": True, "bias": True, "track_running_stats": True,
            "requires_grad": (True, True), "options": {}}


def _unfreeze(frozen: FrozenBatchNorm, config: dict, cls: type | None = None, **options) -> torch.nn.Module:
    """A trainable batch norm of ``cls`` (default: the remembered class) with ``frozen``'s values, cloned."""
    kept = dict(config["options"]) if cls is None else {}
    kept.update(options)
    cls = cls or config["cls"]
    new = build(cls, frozen.num_features, frozen.eps, config["momentum"], config["affine"],
                config["track_running_stats"], device=torch.device("meta"), bias=config["bias"], **kept)
    requires_grad = iter(config["requires_grad"])
    with torch.no_grad():
        if new.weight is not None:
            new.weight = torch.nn.Parameter(frozen.weight.detach().clone(), requires_grad=next(requires_grad, True))
        if new.bias is not None:
            new.bias = torch.nn.Parameter(frozen.bias.detach().clone(), requires_grad=next(requires_grad, True))
        if new.running_mean is not None:
            new.running_mean = frozen.running_mean.detach().clone()
            new.running_var = frozen.running_var.detach().clone()
            new.num_batches_tracked = frozen.num_batches_tracked.detach().clone()
    new.training = frozen.training
    if "sync_state" in config and hasattr(new, "_init_sync_state"):
        new._init_sync_state(*config["sync_state"])
    if "qconfig" in config:
        new.qconfig = config["qconfig"]
    return new


__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]
