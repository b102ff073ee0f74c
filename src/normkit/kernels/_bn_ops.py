"""The batch-norm kernels as torch operators, so that compilers and tracers see them: ``normkit::bn_train``,
``normkit::bn_eval`` and ``normkit::bn_backward`` (``torch.library.custom_op``, each with a fake implementation).

``torch.compile(fullgraph=True)`` and fake tensors trace these ops through their fake implementations (output
shapes, dtypes and memory formats, no launch), tested on CPU under the interpreter; ``torch.export`` and ``make_fx``
take the same route (not tested here). The compiled graph calls them like any extern kernel; CUDA-graph capture
records their launches (not yet run on a GPU, see docs/kernels.md). Eagerly, on plain tensors, the same bodies are
called directly: a Python operator's dispatch costs tens of microseconds a call, more than the rest of the host side
(``benchmarks/bench_host.py``). Either way the same code launches the same kernels.

``bn_train`` mutates the running statistics and the counter (declared). The ticket counters the reductions use are
left as they were found (zero), so they are not an input of the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _batch_norm as impl
from ._bn_launch import output_format

_ACTS = (None, "relu", "silu")


def _act(code: int) -> str | None:
    return _ACTS[code]


def _code(act: str | None) -> int:
    return _ACTS.index(act)


@torch.library.custom_op("normkit::bn_train", mutates_args=("running_mean", "running_var", "counter"))
def _bn_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
              running_mean: Tensor | None, running_var: Tensor | None, counter: Tensor | None, momentum: float,
              eps: float, bessel: float, skip_nonfinite: bool, channel: int, act: int,
              want_bits: bool) -> tuple[Tensor, Tensor, Tensor]:
    y, stats, bits = impl.train_forward(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps,
                                        bessel, skip_nonfinite, channel, _act(act), want_bits)
    return y, stats, bits if bits is not None else x.new_empty(0, dtype=torch.uint8)


@_bn_train.register_fake
def _(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps, bessel, skip_nonfinite, channel,
      act, want_bits):
    stats = x.new_empty((2, x.shape[channel]), dtype=torch.float32)
    bits = x.new_empty(((x.numel() + 7) // 8 if want_bits else 0,), dtype=torch.uint8)
    return torch.empty_like(x, memory_format=output_format(x)), stats, bits


@torch.library.custom_op("normkit::bn_eval", mutates_args=())
def _bn_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
             residual: Tensor | None, eps: float, channel: int, act: int) -> Tensor:
    return impl.eval_forward(x, running_mean, running_var, weight, bias, residual, eps, channel, _act(act))


@_bn_eval.register_fake
def _(x, running_mean, running_var, weight, bias, residual, eps, channel, act):
    return torch.empty_like(x, memory_format=output_format(x))


@torch.library.custom_op("normkit::bn_backward", mutates_args=())
def _bn_backward(grad_output: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 residual: Tensor | None, mean: Tensor, var: Tensor, eps: float, channel: int, act: int,
                 training: bool, need: list[bool], bits: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    results = impl.backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, _act(act), training,
                            tuple(need), bits)
    return tuple(t if t is not None else x.new_empty(0) for t in results)  # an op returns tensors, never None


@_bn_backward.register_fake
def _(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training, need, bits):
    like_x = torch.empty_like(x, memory_format=output_format(x))
    none = x.new_empty(0)
    return (like_x if need[0] else none, torch.empty_like(weight) if need[1] and weight is not None else none,
            torch.empty_like(bias) if need[2] and bias is not None else none,
            torch.empty_like(x, memory_format=output_format(x)) if need[3] else none)


def plain_eager(x: Tensor) -> bool:
    """A plain tensor outside any compiler, tracer or functorch transform: the bodies are called directly (and the
    autograd functions may skip ``Function.apply``'s Python bookkeeping, which only those transforms need)."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
            and not torch._C._are_functorch_transforms_active())


def train(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps, bessel, skip_nonfinite,
          channel, act, want_bits):
    """``(y, stats, bits)`` of a training forward (see :func:`normkit.kernels._batch_norm.train_forward`)."""
    if plain_eager(x):
        return impl.train_forward(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps,
                                  bessel, skip_nonfinite, channel, act, want_bits)
    y, stats, bits = torch.ops.normkit.bn_train(x, weight, bias, residual, running_mean, running_var, counter,
                                                momentum, eps, bessel, skip_nonfinite, channel, _code(act), want_bits)
    return y, stats, bits if want_bits else None


def evaluate(x, running_mean, running_var, weight, bias, residual, eps, channel, act):
    """The output of an evaluation forward."""
    if plain_eager(x):
        return impl.eval_forward(x, running_mean, running_var, weight, bias, residual, eps, channel, act)
    return torch.ops.normkit.bn_eval(x, running_mean, running_var, weight, bias, residual, eps, channel, _code(act))


def backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training, need, bits=None):
    """``(dx, dweight, dbias, dresidual)``, ``None`` where ``need`` does not ask."""
    if plain_eager(x) and type(grad_output) is torch.Tensor:
        return impl.backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training, need,
                             bits)
    results = torch.ops.normkit.bn_backward(grad_output, x, weight, bias, residual, mean, var, eps, channel,
                                            _code(act), training, list(need), bits)
    wanted = (need[0], need[1] and weight is not None, need[2] and bias is not None, need[3])
    return tuple(t if want else None for t, want in zip(results, wanted, strict=True))
