"""``ScaledStdConv2d``: the scaled weight standardization of normalizer-free networks (NFNets, Brock et al. 2021)."""

from __future__ import annotations

import math

import torch

from ._state_loading import AtomicStateLoading


def _require_positive_finite(name: str, value, allow_zero: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"ScaledStdConv2d: {name} must be a finite {bound} number, got {value!r}.")
    return float(value)


class ScaledStdConv2d(AtomicStateLoading, torch.nn.Conv2d):
    r"""A :class:`torch.nn.Conv2d` whose filters are standardized and scaled on every call (NFNets' scaled WS).

    .. math::
        \hat W_i = g_i \cdot \frac{\gamma}{\sqrt{\text{fan\_in}}} \cdot
            \frac{W_i - \mathrm{mean}(W_i)}{\sqrt{\mathrm{Var}(W_i) + \epsilon}}

    for each output filter :math:`W_i` (mean and biased variance over its ``fan_in = in_channels / groups *
    kernel_h * kernel_w`` values), then ``conv2d(x, Ŵ, bias, ...)``. Brock et al. 2021 (arXiv 2101.08692 and
    2102.06171); semantics of timm's ``ScaledStdConv2d``: the per-filter mean of :math:`\hat W` is 0 and its std is
    :math:`g_i \gamma\, \text{fan\_in}^{-1/2} \sigma_i / \sqrt{\sigma_i^2 + \epsilon}` (``g_i * gamma *
    fan_in**-0.5`` up to eps). ``gamma`` is the activation's gain (e.g. about 1.7139 after a ReLU in NFNets).

    The state_dict is Conv2d's (``weight``, ``bias``) plus ``gain`` of shape ``(out_channels, 1, 1, 1)`` when
    ``gain=True``; a plain Conv2d state_dict loads (``gain`` then keeps its current value). ``weight`` stays the raw,
    unstandardized tensor; :meth:`standardized_weight` returns :math:`\hat W`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as :class:`torch.nn.Conv2d` (``stride=1``, ``padding=0``, ``dilation=1``, ``groups=1``,
            ``bias=True``, ``padding_mode="zeros"``).
        gain: learn a per-filter gain :math:`g` (a Parameter). ``False``: :math:`g = 1`. Default: ``True``.
        gamma: fixed scale :math:`\gamma > 0`. Default: ``1.0``.
        eps: added to the filter variance, :math:`\ge 0`. Default: ``1e-6`` (timm).
        gain_init: initial value of the gain. Default: ``1.0``.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` or :math:`(C_{in}, H, W)`. Output: as :class:`torch.nn.Conv2d`.

    Examples::

        >>> import torch
        >>> from normkit.nn.scaled_std_conv import ScaledStdConv2d
        >>> conv = ScaledStdConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
        >>> w = conv.standardized_weight()
        >>> bool(w.flatten(1).mean(1).abs().max() < 1e-6)
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 gain: bool = True, gamma: float = 1.0, eps: float = 1e-6, gain_init: float = 1.0) -> None:
        gamma = _require_positive_finite("gamma", gamma)
        eps = _require_positive_finite("eps", eps, allow_zero=True)
        if isinstance(gain_init, bool) or not isinstance(gain_init, (int, float)) or not math.isfinite(gain_init):
            raise ValueError(f"ScaledStdConv2d: gain_init must be a finite number, got {gain_init!r}.")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.gamma = gamma
        self.eps = eps
        if gain:
            self.gain = torch.nn.Parameter(torch.full((out_channels, 1, 1, 1), float(gain_init), device=device,
                                                      dtype=self.weight.dtype))
        else:
            self.register_parameter("gain", None)
            if gain_init != 1.0:
                raise ValueError(f"ScaledStdConv2d: gain_init={gain_init!r} needs gain=True (no gain is learned).")

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    @property
    def scale(self) -> float:
        """``gamma * fan_in ** -0.5``."""
        return self.gamma * self.fan_in ** -0.5

    def standardized_weight(self) -> torch.Tensor:
        """:math:`\\hat W`, the filter bank the convolution uses (differentiable in ``weight`` and ``gain``)."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
        scale = self.scale if self.gain is None else self.gain * self.scale
        return (w - mean) * (torch.rsqrt(var + self.eps) * scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "gain"
        if self.gain is not None and key not in state_dict:  # a plain Conv2d checkpoint: keep the current gain
            state_dict[key] = self.gain.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", gamma={self.gamma}, eps={self.eps}"
        if self.gain is None:
            text += ", gain=False"
        return text


__all__ = ["ScaledStdConv2d"]
