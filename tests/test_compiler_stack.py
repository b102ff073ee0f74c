"""What works around the layer: torch.compile (fullgraph, parity with eager), torch.export, torch.func, forward-mode
AD and TorchScript, for every module of the family, in training and evaluation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import normkit

# torch itself calls deprecated TorchScript entry points inside inductor and torch.func on torch >= 2.10 (forward AD
# loads its jvp decompositions with torch.jit.script); torch 2.15 raises that warning as a FutureWarning
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script.*is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script.*is deprecated:FutureWarning"),
              pytest.mark.usefixtures("composition_from_128_values")]


def _family():
    """name -> (constructor, input shape): every module of the family."""
    return {
        "BatchNorm1d": (lambda: normkit.BatchNorm1d(4), (6, 4, 5)),
        "BatchNorm2d": (lambda: normkit.BatchNorm2d(4), (6, 4, 5, 5)),
        "BatchNorm2d-planes": (lambda: normkit.BatchNorm2d(4), (6, 4, 16, 16)),  # normkit's statistics pass
        "BatchNorm2d-biased-momentum_None": (lambda: normkit.BatchNorm2d(4, momentum=None, running_var="biased"),
                                             (6, 4, 5, 5)),
        "BatchNorm3d": (lambda: normkit.BatchNorm3d(4), (4, 4, 3, 3, 3)),
        "GroupNorm": (lambda: normkit.nn.GroupNorm(2, 4), (6, 4, 5, 5)),
        "LayerNorm": (lambda: normkit.nn.LayerNorm(5), (6, 4, 5, 5)),
        "InstanceNorm2d": (lambda: normkit.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                           (6, 4, 5, 5)),
        "FrozenBatchNorm2d": (lambda: normkit.FrozenBatchNorm2d(4), (6, 4, 5, 5)),
        "BatchNormAct2d": (lambda: normkit.BatchNormAct2d(4, act="silu"), (6, 4, 5, 5)),
        "BatchRenorm2d": (lambda: normkit.BatchRenorm2d(4, warmup_steps=1, rmax_ramp_end=3, dmax_ramp_end=3),
                          (6, 4, 5, 5)),
        "GhostBatchNorm2d": (lambda: normkit.GhostBatchNorm2d(4, virtual_batch_size=2), (6, 4, 5, 5)),
        "CrossIterationBatchNorm2d-window1": (lambda: normkit.CrossIterationBatchNorm2d(4, window=1),
                                              (6, 4, 5, 5)),
        "StreamingBatchNorm2d": (lambda: normkit.StreamingBatchNorm2d(4), (6, 4, 5, 5)),
    }


FAMILY = _family()


def _build(name):
    make, shape = FAMILY[name]
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():  # non-trivial state, the same for every copy
        for tensor in module.parameters():
            tensor.uniform_(0.5, 1.5)
        for tensor in module.buffers():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.5)
    return module, torch.randn(shape) * 2 + 0.5


def _steps(module, x, steps=3):
    """Run ``steps`` forward/backward passes: outputs, input gradients, parameter gradients and the final state."""
    outputs, grads = [], []
    for step in range(steps):
        xi = (x + step).detach().requires_grad_()
        y = module(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        outputs.append(y.detach())
        grads.append(xi.grad)
    params = {k.removeprefix("_orig_mod."): p.grad for k, p in module.named_parameters()}
    state = {k.removeprefix("_orig_mod."): b.clone() for k, b in module.state_dict().items()}
    return outputs, grads, params, state


def _assert_same(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FAMILY)
def test_compile_fullgraph_equals_eager(name, training):
    module, x = _build(name)
    eager, compiled_module = module.train(training), copy.deepcopy(module).train(training)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    _assert_same(_steps(compiled, x), _steps(eager, x))


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), normkit.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3), normkit.BatchNorm2d(8), nn.ReLU(inplace=True))


@pytest.mark.parametrize("hw", [6, 16], ids=["short-planes", "planes"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_conv_net_has_no_graph_break(hw, training):
    net = _conv_net().train(training)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net)(torch.randn(4, 3, hw, hw))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_inductor_trains_a_conv_net_like_eager():
    torch.manual_seed(0)
    eager = _conv_net()
    compiled_net = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net, backend="inductor", fullgraph=True)
    x = torch.randn(4, 3, 16, 16)
    _assert_same(_steps(compiled, x, steps=2), _steps(eager, x, steps=2), tol=1e-4)
    eager.eval(), compiled_net.eval()
    _assert_same(compiled(x), eager(x), tol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FAMILY)
def test_torch_export(name, training):
    module, x = _build(name)
    module.train(training)
    exported_state = copy.deepcopy(module)
    program = torch.export.export(exported_state, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    # ATen ops only; the layers built on batch norm may keep torch's no_grad regions as higher-order ops
    allowed = ("aten.", "<built-in function getitem>", "wrap_with_set_grad_enabled", "normkit.snapshot")
    assert all(t.startswith(allowed) for t in targets), targets
    runnable = program.module()
    for step in range(2):  # the exported training graph moves the running statistics like the eager module
        _assert_same(runnable(x + step), module(x + step))
    expected = {k: v for k, v in module.state_dict().items()}
    for key, value in runnable.state_dict().items():
        _assert_same(value, expected[key])


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_cross_iteration_with_a_window_compiles_with_a_documented_graph_break():
    """Pooling past iterations takes derivatives of the statistics inside the forward (torch.autograd.grad),
    which dynamo does not trace: the compiled model runs that step eagerly and still equals eager."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    layer = normkit.CrossIterationBatchNorm2d(4, window=3, burn_in=0, weight_of=conv)
    eager = nn.Sequential(conv, layer)
    other = copy.deepcopy(eager)
    other[1].bind(other[0])
    torch._dynamo.reset()
    compiled = torch.compile(other, backend="aot_eager")
    x = torch.randn(4, 3, 7, 7)
    _assert_same(_steps(compiled, x), _steps(eager, x))


# --------------------------------------------------------------------------------- torch.func and forward AD

TWINS = {
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    "BatchNorm2d-planes": (lambda: normkit.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (4, 3, 16, 16)),
    "BatchNorm2d-untracked": (lambda: normkit.BatchNorm2d(3, track_running_stats=False),
                              lambda: nn.BatchNorm2d(3, track_running_stats=False), (4, 3, 16, 16)),
    "BatchNorm1d": (lambda: normkit.BatchNorm1d(3), lambda: nn.BatchNorm1d(3), (4, 3)),
    "GroupNorm": (lambda: normkit.nn.GroupNorm(3, 3), lambda: nn.GroupNorm(3, 3), (4, 3, 5, 5)),
    "LayerNorm": (lambda: normkit.nn.LayerNorm(5), lambda: nn.LayerNorm(5), (4, 3, 5, 5)),
    "InstanceNorm2d": (lambda: normkit.nn.InstanceNorm2d(3, affine=True),
                       lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 5, 5)),
}


def _transforms(module, x):
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = dict(module.named_buffers())

    def loss(p, xx):
        return functional_call(module, (p, buffers), (xx,)).square().sum()

    def forward_ad():
        with fwAD.dual_level():
            return fwAD.unpack_dual(module(fwAD.make_dual(x, torch.ones_like(x)))).tangent

    return {
        "grad": lambda: grad(loss, argnums=(0, 1))(params, x),
        "vmap": lambda: vmap(lambda xi: functional_call(module, (params, buffers), (xi,)))(torch.stack([x, 2 * x])),
        "jvp": lambda: jvp(lambda xx: functional_call(module, (params, buffers), (xx,)), (x,), (torch.ones_like(x),)),
        "forward_ad": forward_ad,
    }


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp", "forward_ad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", TWINS)
def test_torch_func_works_wherever_torchs_twin_does(name, training, transform):
    ours_make, theirs_make, shape = TWINS[name]
    ours, theirs = ours_make().train(training).double(), theirs_make().train(training).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    try:
        expected = _transforms(theirs, x)[transform]()
    except RuntimeError as error:  # torch's layer does not support it (e.g. vmap over tracked statistics)
        with pytest.raises(RuntimeError):
            _transforms(ours, x)[transform]()
        pytest.skip(f"torch's {theirs_make().__class__.__name__} does not support this either: {error}")
    _assert_same(_transforms(ours, x)[transform](), expected, tol=1e-9)
    _assert_same(dict(ours.named_buffers()), dict(theirs.named_buffers()), tol=1e-9)


# --------------------------------------------------------------------------------- TorchScript

SCRIPTABLE = {
    "BatchNorm2d": (lambda: normkit.BatchNorm2d(3), (4, 3, 5, 5)),
    "BatchNorm1d": (lambda: normkit.BatchNorm1d(3), (4, 3, 6)),
    "BatchNorm3d": (lambda: normkit.BatchNorm3d(3), (4, 3, 2, 2, 2)),
    "GroupNorm": (lambda: normkit.nn.GroupNorm(3, 3), (4, 3, 5, 5)),
    "LayerNorm": (lambda: normkit.nn.LayerNorm(5), (4, 3, 5)),
    "InstanceNorm2d": (lambda: normkit.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 5, 5)),
    "FrozenBatchNorm2d": (lambda: normkit.FrozenBatchNorm2d(3), (4, 3, 5, 5)),
}


def _script(module):
    with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript with a warning on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("name", SCRIPTABLE)
def test_torchscript_runs_the_same_layer_on_the_same_tensors(name):
    make, shape = SCRIPTABLE[name]
    module, reference = make(), make()
    scripted = _script(nn.Sequential(module))
    for training in (True, False, True):
        scripted.train(training), reference.train(training)
        x = torch.randn(shape)
        _assert_same(scripted(x), reference(x))
        _assert_same(dict(module.named_buffers()), dict(reference.named_buffers()))


@pytest.mark.parametrize("make", [
    lambda: normkit.BatchNormAct2d(3), lambda: normkit.BatchRenorm2d(3), lambda: normkit.GhostBatchNorm2d(3, 2),
    lambda: normkit.StreamingBatchNorm2d(3), lambda: normkit.CrossIterationBatchNorm2d(3),
    lambda: normkit.BatchNorm2d(3, running_var="biased"),
], ids=["act", "renorm", "ghost", "streaming", "cross-iteration", "biased"])
def test_torchscript_refuses_what_torch_cannot_run_with_a_pointer(make):
    with pytest.raises(NotImplementedError, match="torch.compile or torch.export"):
        _script(make())
