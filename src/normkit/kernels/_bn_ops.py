"""The batch-norm kernels as torch operators, so that compilers and tracers see them: ``normkit::bn_train``,
``normkit::bn_eval`` and ``normkit::bn_backward``, registered with ``torch.library.triton_op``.

``torch.compile(fullgraph=True)``, ``torch.export`` and fake tensors trace these ops (their fake implementation is
their own body with the launches recorded, not run, through ``torch.library.wrap_triton``); Inductor can see the
Triton kernels inside, and CUDA-graph capture records them like any kernel. Eagerly, on plain tensors, the same
bodies are called directly: a Python operator's dispatch costs tens of microseconds a call, more than the rest of
the host side (``benchmarks/bench_host.py``). Either way the same code launches the same kernels.

``bn_train`` mutates the running statistics and the counter (declared); the ticket counters it uses are left as it
found them (zero), so they are not an input at all: traced calls get a fresh zeroed buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _batch_norm as impl

_ACTS = (None, "relu", "silu")
_EMPTY = ()


def _act(code: int) -> str | None:
    return _ACTS[code]


def _code(act: str | None) -> int:
    return _ACTS.index(act)


@torch.library.triton_op("normkit::bn_train", mutates_args=("running_mean", "running_var", "counter"))
def _bn_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
              running_mean: Tensor | None, running_var: Tensor | None, counter: Tensor | None, momentum: float,
              eps: float, bessel: float, skip_nonfinite: bool, channel: int, act: int) -> tuple[Tensor, Tensor]:
    return impl.train_forward(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps, bessel,
                              skip_nonfinite, channel, _act(act), traced=True)


@torch.library.triton_op("normkit::bn_eval", mutates_args=())
def _bn_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
             residual: Tensor | None, eps: float, channel: int, act: int) -> Tensor:
    return impl.eval_forward(x, running_mean, running_var, weight, bias, residual, eps, channel, _act(act),
                             traced=True)


@torch.library.triton_op("normkit::bn_backward", mutates_args=())
def _bn_backward(grad_output: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 residual: Tensor | None, mean: Tensor, var: Tensor, eps: float, channel: int, act: int,
                 training: bool, need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    results = impl.backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, _act(act), training,
                            tuple(need), traced=True)
    return tuple(t if t is not None else x.new_empty(0) for t in results)  # an op returns tensors, never None


def _eager(x: Tensor) -> bool:
    """A plain tensor outside any compiler or tracer: call the bodies directly."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None


def train(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps, bessel, skip_nonfinite,
          channel, act):
    """``(y, stats)`` of a training forward (see :func:`normkit.kernels._batch_norm.train_forward`)."""
    if _eager(x):
        return impl.train_forward(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps,
                                  bessel, skip_nonfinite, channel, act)
    return torch.ops.normkit.bn_train(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps,
                                      bessel, skip_nonfinite, channel, _code(act))


def evaluate(x, running_mean, running_var, weight, bias, residual, eps, channel, act):
    """The output of an evaluation forward."""
    if _eager(x):
        return impl.eval_forward(x, running_mean, running_var, weight, bias, residual, eps, channel, act)
    return torch.ops.normkit.bn_eval(x, running_mean, running_var, weight, bias, residual, eps, channel, _code(act))


def backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training, need):
    """``(dx, dweight, dbias, dresidual)``, ``None`` where ``need`` does not ask."""
    if _eager(x) and type(grad_output) is torch.Tensor:
        return impl.backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training, need)
    results = torch.ops.normkit.bn_backward(grad_output, x, weight, bias, residual, mean, var, eps, channel,
                                            _code(act), training, list(need))
    wanted = (need[0], need[1] and weight is not None, need[2] and bias is not None, need[3])
    return tuple(t if want else None for t, want in zip(results, wanted, strict=True))
