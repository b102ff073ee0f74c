"""The registry of modules that the contract tests drive: a constructor, sample inputs, and torch's twin."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import normkit
from normkit.nn._torch_compat import with_bias


@dataclass(frozen=True)
class Case:
    ours: type
    reference: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: tuple[tuple[int, ...], ...] = ()
    memory_format: torch.memory_format = torch.contiguous_format

    def __str__(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        fmt = "" if self.memory_format == torch.contiguous_format else f"-{str(self.memory_format).split('.')[-1]}"
        return f"{self.ours.__name__}({options}){fmt}"

    def build_pair(self, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Our module and torch's with identical, non-trivial parameters and buffers."""
        ours = self.ours(*self.args, **self.kwargs)
        torch_kwargs = {k: v for k, v in self.kwargs.items() if k not in ("running_var", "nonfinite")}
        theirs = with_bias(self.reference)(*self.args, **torch_kwargs)  # torch 2.11: bias= backported
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in ours.parameters():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            if ours.running_mean is not None:
                ours.running_mean.copy_(torch.randn(ours.running_mean.shape, generator=gen))
                ours.running_var.copy_(torch.rand(ours.running_var.shape, generator=gen) + 0.5)
        theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
        return ours, theirs

    def sample(self, shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)
        if self.memory_format != torch.contiguous_format:
            x = x.contiguous(memory_format=self.memory_format)
        return x


def _bn_cases(ours, theirs, shapes, formats=(torch.contiguous_format,)):
    variants = [
        {},
        {"affine": False},
        {"track_running_stats": False},
        {"momentum": None},
        {"bias": False},
        {"momentum": 1.0, "eps": 1e-3},
    ]
    return [Case(ours, theirs, (5,), kw, shapes, fmt) for fmt in formats for kw in variants]


MODULES: list[Case] = [
    *_bn_cases(normkit.BatchNorm1d, torch.nn.BatchNorm1d, ((7, 5), (4, 5, 9))),
    *_bn_cases(normkit.BatchNorm2d, torch.nn.BatchNorm2d, ((4, 5, 6, 3), (2, 5, 1, 7)),
               (torch.contiguous_format, torch.channels_last)),
    *_bn_cases(normkit.BatchNorm3d, torch.nn.BatchNorm3d, ((2, 5, 3, 4, 2),),
               (torch.contiguous_format, torch.channels_last_3d)),
]
