"""A normkit model in eval exports: torch.export (standard ATen ops only) and ONNX (onnxruntime within 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.tools.fold import fold

# torch's own exporter warns about its own pytree API (torch.nn.BatchNorm2d triggers it just the same).
TORCH_INTERNAL = "ignore:.*LeafSpec.*:FutureWarning"


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), normkit.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), normkit.BatchNorm2d(4, running_var="biased", nonfinite="raise"),
        nn.Unflatten(1, (4, 1)), normkit.BatchNorm3d(4), nn.Flatten(),
        nn.Linear(64, 5), normkit.BatchNorm1d(5), nn.Linear(5, 3), normkit.BatchNorm1d(3, affine=False),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _torch_bn_op() -> str:
    """The op torch.export gives for torch's own BatchNorm2d in eval (``aten.batch_norm`` on recent torch)."""
    program = torch.export.export(torch.nn.BatchNorm2d(3).eval(), (torch.randn(2, 3, 4, 4),))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    assert len(ops) == 1, ops
    return ops[0]


def test_torch_export_gives_standard_aten_ops_and_the_same_output():
    net = model()
    x = torch.randn(2, 3, 6, 6)
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert _torch_bn_op() in targets  # what torch's own BN exports to
    assert all(t.startswith("aten.") or t == "<built-in function getitem>" for t in targets), targets
    for shape in [(2, 3, 6, 6), (9, 3, 6, 6)]:
        y = torch.randn(shape)
        torch.testing.assert_close(program.module()(y), net(y), atol=1e-6, rtol=1e-6)


def test_torch_export_of_a_folded_model_has_no_batch_norm():
    net = model()
    x = torch.randn(2, 3, 6, 6)
    folded = fold(net)
    program = torch.export.export(folded, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    # the three BNs that follow a Conv/Linear fold; the BatchNorm3d after Unflatten and nothing else stays
    assert targets.count(_torch_bn_op()) == 1
    torch.testing.assert_close(program.module()(x), net(x), atol=1e-5, rtol=1e-5)


def _onnx_session(program_or_path):
    ort = pytest.importorskip("onnxruntime")
    source = program_or_path.model_proto.SerializeToString() if hasattr(program_or_path, "model_proto") else (
        str(program_or_path))
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


@pytest.mark.filterwarnings(TORCH_INTERNAL)
def test_onnx_export_matches_onnxruntime():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    net = model()
    x = torch.randn(2, 3, 6, 6)
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.onnx.export(net, (x,), dynamo=True, verbose=False, dynamic_shapes=({0: batch},))
    session = _onnx_session(program)
    name = session.get_inputs()[0].name
    for shape in [(2, 3, 6, 6), (16, 3, 6, 6)]:
        y = torch.randn(shape)
        (out,) = session.run(None, {name: y.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), net(y).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("library", ["torch", "normkit"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_legacy_torchscript_onnx_export(tmp_path, library):
    pytest.importorskip("onnx")
    net = model()
    if library == "torch":
        net = _to_torch(net)
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "model.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False)
    session = _onnx_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), net(x).detach(), atol=1e-5, rtol=1e-5)


def _to_torch(net: nn.Module) -> nn.Module:
    """The same model with torch's classes (torch cannot store the biased variance: load it as is, eval only)."""
    kinds = {normkit.BatchNorm1d: nn.BatchNorm1d, normkit.BatchNorm2d: nn.BatchNorm2d,
             normkit.BatchNorm3d: nn.BatchNorm3d}
    for name, child in list(net.named_children()):
        if type(child) in kinds:
            new = kinds[type(child)](child.num_features, child.eps, affine=child.affine)
            new.load_state_dict(child.state_dict())
            setattr(net, name, new.eval())
    return net
