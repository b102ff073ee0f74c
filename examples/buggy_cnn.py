"""A small CNN with the classic batch-norm mistakes planted, and the same CNN done right.

    normkit doctor examples/buggy_cnn.py:buggy --input-shape 4,3,32,32        # exit status 1: errors found
    normkit doctor examples/buggy_cnn.py:clean --input-shape 32,3,32,32       # exit status 0
    normkit doctor examples/buggy_cnn.py:buggy --input-shape 4,3,32,32 --json

The custom ``forward`` (not an ``nn.Sequential``) is on purpose: the doctor follows it with forward hooks.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv -> BN -> ReLU, twice, then pooling and a classifier head; ``buggy=True`` plants the mistakes."""

    def __init__(self, classes: int = 10, *, buggy: bool = False) -> None:
        super().__init__()
        momentum = 0.99 if buggy else 0.1  # planted: a Keras momentum pasted into torch
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=buggy)  # planted: a bias the BN cancels
        self.bn1 = nn.BatchNorm2d(16, momentum=momentum)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        # planted: Dropout before the BN instead of after the activation
        self.drop = nn.Dropout2d(0.2)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, classes)
        self.out_bn = nn.BatchNorm1d(classes) if buggy else nn.Identity()  # planted: BN on the logits
        self.buggy = buggy
        if buggy:  # planted: "frozen" pretrained BN whose statistics still update in training mode
            self.bn1.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.buggy:
            x = self.bn2(self.drop(self.conv2(x)))
        else:
            x = self.drop(torch.relu(self.bn2(self.conv2(x))))
        return self.out_bn(self.head(self.pool(x).flatten(1)))


def buggy() -> nn.Module:
    """The CNN with five planted mistakes, in training mode (a batch under 8 makes a sixth)."""
    return SmallCNN(buggy=True)


def clean() -> nn.Module:
    """The same CNN done right (in training mode)."""
    return SmallCNN(buggy=False)
