"""``CrossIterationBatchNorm2d``: batch statistics pooled over recent iterations (Yao et al., CVPR 2021)."""

from __future__ import annotations

import torch

from ..functional import _checks, _stats
from . import _scripting
from .batchnorm import BatchNorm2d


def _require_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"window must be an int >= 1 (the number of iterations whose statistics are pooled, the current one "
            f"included), got {window!r}. window=1 is plain batch norm; the paper's COCO configs use window=4."
        )
    return window


def _require_burn_in(burn_in) -> int:
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0 (training iterations with plain batch statistics), got "
                         f"{burn_in!r}. Use burn_in=0 to pool from the first iteration.")
    return burn_in


class CrossIterationBatchNorm2d(BatchNorm2d):
    r"""Cross-iteration batch normalization (Yao, Cao, Zheng, Huang and Lin, "Cross-Iteration Batch Normalization",
    CVPR 2021, https://arxiv.org/abs/2002.05712): the statistics of the last ``window`` training iterations, those
    of past iterations compensated to first order for the change of the preceding layer's weight :math:`\theta`.

    .. math::
        \mu_{t-\tau}(\theta_t) \approx \mu_{t-\tau} + \rho \sum \frac{\partial \mu_{t-\tau}}{\partial \theta}
        \odot (\theta_t - \theta_{t-\tau}), \qquad
        \bar\mu = \frac{1}{k} \sum_{\tau=0}^{k-1} \mu_{t-\tau}(\theta_t), \qquad
        \bar\sigma^2 = \frac{1}{k} \sum_{\tau=0}^{k-1} \nu_{t-\tau}(\theta_t) - \bar\mu^2

    with :math:`\nu = \mathrm{E}[x^2]` compensated the same way, iterations whose compensated
    :math:`\nu - \mu^2` is negative left out of the average (the official code's count mask), and
    :math:`y = (x - \bar\mu) / \sqrt{\bar\sigma^2 + \epsilon} \cdot \gamma + \beta`. Gradients flow through the
    current iteration's statistics only (past ones are constants, as in the official code). The derivatives
    :math:`\partial\mu/\partial\theta`, :math:`\partial\nu/\partial\theta` are taken by autograd from the current
    graph, so the input must be computed from the preceding layer's weight in the same forward.

    The preceding layer is given as ``weight_of=conv`` or with :meth:`bind`; its weight's dim 0 must index this
    layer's channels (``Conv2d``, ``Linear``-like). Only that weight is compensated (its bias is not, as in the
    paper). Parameters, buffers and the state_dict are those of :class:`~normkit.nn.batchnorm.BatchNorm2d`; the
    window (past statistics, derivatives and weights) is transient state, not saved.

    Differences from the official ``CBatchNorm2d``, by decision: eps is inside the square root (torch's BN,
    the official ``out_p=True``), and the window's variance is the biased one (the official code also normalizes by
    the current batch's *unbiased* variance when the window is empty; here that case is exactly BN). As in the
    official code: the running statistics move with the current batch's mean and unbiased variance (exactly
    :class:`BatchNorm2d`'s update), the evaluation is BN with the running statistics, and during ``burn_in``
    iterations (``two_stage=True``) the statistics are the batch's and nothing is stored.

    Args:
        num_features: the number of channels :math:`C`.
        window: :math:`k`, iterations pooled, the current one included; ``1`` is plain BN. Default: ``4``.
        burn_in: training iterations (counted by this module) with plain BN statistics before pooling starts.
            Default: ``0``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: EMA factor of the running statistics, or ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable :math:`\gamma`, :math:`\beta`. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        weight_of: the preceding layer (a module with a ``weight``), or its weight tensor. Default: ``None``
            (then :meth:`bind` it, or pass ``weight=`` to :meth:`forward`; needed when ``window > 1``).
        rho: :math:`\rho`, the compensation factor (``0`` turns compensation off). Default: ``1.0``.
        two_stage: ``True`` (official default) pools nothing until ``burn_in`` iterations have passed; ``False``
            grows the window linearly over them, ``int((window - 1) * min(t / burn_in, 1))`` past iterations.
        bias, running_var, nonfinite: as in :class:`~normkit.nn.batchnorm.BatchNorm2d` (keyword-only).

    Shape:
        - Input: :math:`(N, C, H, W)`. Output: same shape.

    Examples::

        >>> import torch
        >>> from normkit.nn.cross_iteration import CrossIterationBatchNorm2d
        >>> conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        >>> cbn = CrossIterationBatchNorm2d(4, window=4, weight_of=conv)
        >>> for _ in range(5):
        ...     y = cbn(conv(torch.randn(2, 3, 8, 8)))
        >>> y.shape, cbn.window_length
        (torch.Size([2, 4, 6, 6]), 3)
    """

    def __init__(self, num_features: int, window: int = 4, burn_in: int = 0, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True, *,
                 weight_of=None, rho: float = 1.0, two_stage: bool = True, device=None, dtype=None,
                 bias: bool = True, running_var: str = "unbiased", nonfinite: str = "skip") -> None:
        _require_window(window)
        _require_burn_in(burn_in)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         running_var=running_var, nonfinite=nonfinite)
        self.window = window
        self.burn_in = burn_in
        self.rho = float(rho)
        self.two_stage = bool(two_stage)
        self.iteration = 0
        self._weight_source = None
        self._past: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if weight_of is not None:
            self.bind(weight_of)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, burn_in={self.burn_in}"

    def bind(self, layer) -> CrossIterationBatchNorm2d:
        """Compensate for the weight of ``layer`` (a module with a ``weight``, or the weight itself); returns self.

        The reference is not registered as a submodule: the state_dict stays BN's.
        """
        weight = layer if isinstance(layer, torch.Tensor) else getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 1 or weight.shape[0] != self.num_features:
            got = "no weight" if not isinstance(weight, torch.Tensor) else f"a weight of shape {tuple(weight.shape)}"
            raise ValueError(
                f"CrossIterationBatchNorm2d.bind: expected the preceding layer (e.g. the Conv2d feeding this layer), "
                f"whose weight's dim 0 has {self.num_features} output channels; got {type(layer).__name__} with "
                f"{got}. Pass the layer whose output this module normalizes."
            )
        object.__setattr__(self, "_weight_source", layer)
        self._past = []
        return self

    @property
    def window_length(self) -> int:
        """How many past iterations the next training forward can pool (at most ``window - 1``)."""
        return len(self._past)

    def reset_window(self) -> None:
        """Forget the stored past iterations (e.g. after loading a checkpoint or changing the data)."""
        self._past = []

    def _bound_weight(self) -> torch.Tensor | None:
        source = self._weight_source
        return source if isinstance(source, torch.Tensor) or source is None else source.weight

    def _past_this_call(self) -> int:
        """The number of past iterations to pool at iteration ``self.iteration + 1``."""
        if self.burn_in == 0:
            return self.window - 1
        t = self.iteration + 1
        if self.two_stage:
            return self.window - 1 if t > self.burn_in else 0
        return int((self.window - 1) * min(t / self.burn_in, 1.0))

    def compensated_statistics(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The stored past iterations' :math:`\mu` and :math:`\nu = \mathrm{E}[x^2]`, compensated to ``weight``.

        Returns two ``(P, C)`` tensors, most recent first (``P`` = :attr:`window_length`).
        """
        if not self._past:
            empty = torch.empty(0, self.num_features)
            return empty, empty
        w = weight.detach()
        means, meanx2s = [], []
        for mu, nu, dmu, dnu, w_old in self._past:
            delta = (w - w_old).to(dmu.dtype)
            means.append(mu + self.rho * (dmu * delta).flatten(1).sum(1))
            meanx2s.append(nu + self.rho * (dnu * delta).flatten(1).sum(1))
        return torch.stack(means), torch.stack(meanx2s)

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "its statistics pool past iterations, which torch's batch norm does not")

    def forward(self, input: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        past = self._past_this_call() if self.training else 0
        pools = (self.training and self.window > 1 and torch.is_grad_enabled() and input.requires_grad
                 and (past > 0 or not self.two_stage))
        if not pools:
            output = super().forward(input)
            if self.training:
                self.iteration += 1
            return output
        weight = weight if weight is not None else self._bound_weight()
        if weight is None:
            raise ValueError(
                "CrossIterationBatchNorm2d with window > 1 needs the preceding layer's weight to compensate past "
                "statistics: construct it with weight_of=conv, call .bind(conv), or pass "
                "forward(x, weight=conv.weight)."
            )
        _checks.validate_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                                    self._ema_factor(), self.eps, self.running_var_mode, 1, self.nonfinite)
        if weight.shape[0] != self.num_features:
            raise ValueError(f"CrossIterationBatchNorm2d: the preceding weight's dim 0 must be {self.num_features} "
                             f"(this layer's channels), got shape {tuple(weight.shape)}. Bind the layer feeding it.")
        acc = _stats.accumulation_dtype(input.dtype)
        xf = input.to(acc)
        dims = (0, 2, 3)
        cur_mu = xf.mean(dims)
        cur_nu = (xf * xf).mean(dims)
        grads = (None, None)
        if weight.requires_grad:
            grads = (torch.autograd.grad(cur_mu.sum(), weight, retain_graph=True, allow_unused=True)[0],
                     torch.autograd.grad(cur_nu.sum(), weight, retain_graph=True, allow_unused=True)[0])
        if grads[0] is None or grads[1] is None:
            raise RuntimeError(
                "CrossIterationBatchNorm2d: the input does not depend on the bound weight in this forward, so the "
                "compensation derivatives cannot be taken. Bind the layer that produces this layer's input, and "
                "call it in the same forward (with gradients enabled)."
            )
        dmu, dnu = grads
        stored = self._past[:past] if past > 0 else []
        if stored:
            old_mu, old_nu = self._compensate(stored, weight)
            mu_all = torch.cat([cur_mu.unsqueeze(0), old_mu.to(acc)])
            nu_all = torch.cat([cur_nu.unsqueeze(0), old_nu.to(acc)])
            keep = (nu_all - mu_all.detach() ** 2 >= 0).to(acc)
            count = keep.sum(0).clamp_min(1)
            mu = (mu_all * keep).sum(0) / count
            var = (nu_all * keep).sum(0) / count - mu * mu
        else:
            mu = cur_mu
            var = cur_nu - cur_mu * cur_mu
        shape = (1, -1, 1, 1)
        y = (xf - mu.view(shape)) * torch.rsqrt(var.clamp_min(0).view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(acc).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(acc).view(shape)
        output = y.to(input.dtype)
        # success: update the running statistics (the current batch's, as in the official code), then the window
        if self._tracks_this_call():
            with torch.no_grad():
                cur_var = ((xf.detach() - cur_mu.detach().view(shape)) ** 2).mean(dims)
                count_values = input.numel() // input.shape[1]
                _stats.update_running_stats(self.running_mean, self.running_var, cur_mu.detach(), cur_var,
                                            count_values, float(self._ema_factor()), self.running_var_mode,
                                            self.nonfinite)
            self.num_batches_tracked.add_(1)
        self.iteration += 1
        if past > 0 or not self.two_stage:  # the official code stores nothing during a two-stage burn-in
            entry = (cur_mu.detach(), cur_nu.detach(), dmu.detach().to(acc), dnu.detach().to(acc),
                     weight.detach().clone())
            self._past = [entry, *self._past][: self.window - 1]
        return output

    def _compensate(self, stored, weight):
        saved, self._past = self._past, stored
        try:
            return self.compensated_statistics(weight)
        finally:
            self._past = saved


__all__ = ["CrossIterationBatchNorm2d"]
