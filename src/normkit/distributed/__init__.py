"""``torch.distributed`` glue for :class:`normkit.nn.SyncBatchNorm`.

torch's ``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm`` (subclasses included) in a CPU
module ("SyncBatchNorm layers only work with GPU modules"), because torch's own layer needs a GPU. normkit's runs on
any backend, so :class:`DistributedDataParallel` here is torch's class with that one check limited to torch's own
layer.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as _TorchDDP

from ..nn.syncbatchnorm import SyncBatchNorm


class DistributedDataParallel(_TorchDDP):
    r"""torch's :class:`~torch.nn.parallel.DistributedDataParallel`, which also accepts normkit's
    :class:`~normkit.nn.SyncBatchNorm` in a CPU (gloo) module.

    .. math::
        \nabla_\theta = \frac{1}{W}\sum_{r=1}^{W} \nabla_\theta L_r

    Same arguments and behaviour as torch's class (it is a subclass, so ``isinstance`` checks keep working); only the
    "SyncBatchNorm layers only work with GPU modules" refusal is skipped when every synchronized layer is normkit's.
    Use it exactly like torch's; on GPU the two are the same.

    Args:
        module: the model, typically after :func:`normkit.tools.sync`; the other arguments are torch's.

    Shape:
        - Input and output: those of ``module``.

    Examples::

        >>> import torch, normkit.distributed
        >>> issubclass(normkit.distributed.DistributedDataParallel, torch.nn.parallel.DistributedDataParallel)
        True
        >>> # in each process, after init_process_group("gloo"):
        >>> # ddp = normkit.distributed.DistributedDataParallel(normkit.tools.sync(model))
    """

    def _passing_sync_batchnorm_handle(self, module: torch.nn.Module) -> None:
        foreign = [layer for layer in module.modules()
                   if isinstance(layer, torch.nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm)]
        if foreign:  # torch's own layers keep torch's checks
            super()._passing_sync_batchnorm_handle(module)


__all__ = ["DistributedDataParallel"]
