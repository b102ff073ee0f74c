"""``load_state_dict`` on normkit's modules writes everything or nothing (normkit/nn/_state_loading.py).

Every failing load is also run with the atomic layer switched off (torch's own loading, key by key): the error
must be the same, and that run must have changed the module, which shows each case would catch a half-written
layer. Successful loads must give torch's result bit for bit.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

import normkit.nn as nkn
from normkit.nn._state_loading import AtomicStateLoading


@dataclass(frozen=True)
class Layer:
    name: str
    build: object  # () -> module
    twin: object = None  # () -> torch's drop-in twin, for the classes that are one

    def __str__(self) -> str:
        return self.name


def _cross_iteration():  # with a bound weight and a filled window: memory a load must not touch
    conv = torch.nn.Conv2d(3, 4, 1)
    layer = nkn.CrossIterationBatchNorm2d(4, window=3).bind(conv)
    for seed in range(3):
        layer(conv(torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(seed))))
    return layer


LAYERS = [
    *[Layer(f"BatchNorm{d}d", getattr(nkn, f"BatchNorm{d}d"), getattr(torch.nn, f"BatchNorm{d}d")) for d in (1, 2, 3)],
    *[Layer(f"BatchNormAct{d}d", getattr(nkn, f"BatchNormAct{d}d")) for d in (1, 2, 3)],
    *[Layer(f"BatchRenorm{d}d", getattr(nkn, f"BatchRenorm{d}d")) for d in (1, 2, 3)],
    Layer("BatchRenorm2d-keras", lambda c: nkn.BatchRenorm2d(c, keras_compatible=True)),
    Layer("CrossIterationBatchNorm2d", lambda c: _cross_iteration()),
    *[Layer(name, getattr(nkn, name)) for name in ("FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d",
                                                   "FrozenBatchNorm3d", "FrozenBatchNormAct", "FrozenBatchNormAct1d",
                                                   "FrozenBatchNormAct2d", "FrozenBatchNormAct3d")],
    Layer("FrozenBatchNormDropAct", lambda c: nkn.FrozenBatchNormDropAct(c, act=torch.nn.PReLU(c))),
    *[Layer(f"GhostBatchNorm{d}d", lambda c, d=d: getattr(nkn, f"GhostBatchNorm{d}d")(c, 2)) for d in (1, 2, 3)],
    Layer("GroupNorm", lambda c: nkn.GroupNorm(2, c), lambda c: torch.nn.GroupNorm(2, c)),
    *[Layer(f"InstanceNorm{d}d", lambda c, d=d: getattr(nkn, f"InstanceNorm{d}d")(c, affine=True,
                                                                                 track_running_stats=True),
            lambda c, d=d: getattr(torch.nn, f"InstanceNorm{d}d")(c, affine=True, track_running_stats=True))
      for d in (1, 2, 3)],
    Layer("LayerNorm", lambda c: nkn.LayerNorm((c, 3)), lambda c: torch.nn.LayerNorm((c, 3))),
    Layer("NormAct", lambda c: nkn.NormAct(torch.nn.BatchNorm2d(c), torch.nn.PReLU(c))),
    Layer("ResidualAct", lambda c: nkn.ResidualAct()),
    Layer("ScaledStdConv2d", lambda c: nkn.ScaledStdConv2d(3, c, 3)),
    *[Layer(f"StreamingBatchNorm{d}d", getattr(nkn, f"StreamingBatchNorm{d}d")) for d in (1, 2, 3)],
    Layer("SyncBatchNorm", nkn.SyncBatchNorm, torch.nn.SyncBatchNorm),
    Layer("SyncBatchNormAct", nkn.SyncBatchNormAct),
]
WITH_STATE = [layer for layer in LAYERS if layer.name != "ResidualAct"]
TWINS = [layer for layer in LAYERS if layer.twin is not None]
C = 4


def test_every_exported_module_is_covered():
    classes = {getattr(nkn, name) for name in nkn.__all__ if isinstance(getattr(nkn, name), type)}
    covered = {type(layer.build(C)) for layer in LAYERS}
    assert classes - covered == set()
    assert all(issubclass(cls, AtomicStateLoading) for cls in classes)


# --- helpers -----------------------------------------------------------------------------------------------------

def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer filled with seed-dependent values (counters too), so any copy shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.fill_(int(torch.randint(1, 1000, (), generator=gen)))
    return module


def _bits(tensor: torch.Tensor) -> tuple:
    t = tensor.detach().cpu().contiguous().reshape(-1)
    return str(t.dtype), tuple(tensor.shape), t.view(torch.uint8).numpy().tobytes(), tensor.requires_grad


def _plain(value):
    if isinstance(value, torch.Tensor):
        return _bits(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__


def fingerprint(module: torch.nn.Module) -> dict:
    """Every parameter and buffer (values, dtype, shape, requires_grad) and every plain attribute of every
    submodule, e.g. the cross-iteration window or a counter kept outside the buffers."""
    state = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for kind, store in (("param", sub._parameters), ("buffer", sub._buffers)):
            for name, tensor in store.items():
                state[f"{prefix}:{kind}:{name}"] = None if tensor is None else _bits(tensor)
        for name, value in vars(sub).items():
            if not name.endswith("hooks") and name not in ("_parameters", "_buffers", "_modules"):
                state[f"{prefix}:attr:{name}"] = _plain(value)
    return state


def _identities(module: torch.nn.Module) -> dict:
    return {f"{prefix}:{name}": id(t) for prefix, sub in module.named_modules(remove_duplicate=False)
            for store in (sub._parameters, sub._buffers) for name, t in store.items()}


def _pass_through(self, *args):  # torch's loading, without the atomic layer
    super(AtomicStateLoading, self)._load_from_state_dict(*args)


@contextmanager
def torch_semantics():
    original = AtomicStateLoading.__dict__["_load_from_state_dict"]
    AtomicStateLoading._load_from_state_dict = _pass_through
    try:
        yield
    finally:
        AtomicStateLoading._load_from_state_dict = original


def _load(module, state_dict, **kwargs):
    """``(returned keys, None)`` or ``(None, (exception type, message))``."""
    try:
        return module.load_state_dict(state_dict, **kwargs), None
    except Exception as error:  # noqa: BLE001 - the test compares whatever torch raises
        return None, (type(error), str(error))


def check_against_torch(module: torch.nn.Module, state_dict, *, must_fail: bool | None = None, **kwargs):
    """Load into ``module`` and into a copy with torch's semantics; compare. Returns the error (or None)."""
    reference = copy.deepcopy(module)
    before = fingerprint(module)
    ids = _identities(module)
    with torch_semantics():
        expected_keys, expected_error = _load(reference, copy.copy(state_dict), **kwargs)
    keys, error = _load(module, copy.copy(state_dict), **kwargs)
    assert error == expected_error
    if must_fail is not None:
        assert (error is not None) == must_fail, expected_error
    if error is None:
        assert keys == expected_keys
        assert fingerprint(module) == fingerprint(reference)
    else:
        assert fingerprint(module) == before, "a failed load changed the module"
        assert _identities(module) == ids
        assert module._load_state_dict_post_hooks == OrderedDict()
    return error, fingerprint(reference) != before


def _source(layer: Layer) -> OrderedDict:
    """A state_dict of the same layer with other values (so that any copied key shows in the target)."""
    return _randomized(layer.build(C), seed=1).state_dict()


def _target(layer: Layer) -> torch.nn.Module:
    return _randomized(layer.build(C), seed=0)


def _wrong_shape(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*tensor.shape, 2, dtype=tensor.dtype)  # (2,) for a 0-dim counter: no legacy squeeze


# --- one layer -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("layer", WITH_STATE, ids=str)
def test_a_wrong_shape_anywhere_changes_nothing(layer, position):
    state = _source(layer)
    keys = list(state)
    key = {"first": keys[0], "middle": keys[len(keys) // 2], "last": keys[-1]}[position]
    state[key] = _wrong_shape(state[key])
    error, torch_changed_it = check_against_torch(_target(layer), state, must_fail=True)
    assert error[0] is RuntimeError and f"size mismatch for {key}" in error[1]
    assert torch_changed_it or len(keys) == 1


@pytest.mark.parametrize("layer", WITH_STATE, ids=str)
def test_a_non_tensor_value_changes_nothing(layer):
    state = _source(layer)
    key = list(state)[len(state) // 2]
    state[key] = state[key].tolist()
    error, torch_changed_it = check_against_torch(_target(layer), state, must_fail=True)
    assert "expected torch.Tensor or Tensor-like object" in error[1]
    assert torch_changed_it or len(state) == 1


@pytest.mark.parametrize("layer", WITH_STATE, ids=str)
def test_missing_keys_follow_torch(layer):
    """strict=True: torch's error (or torch's defaults: FrozenBatchNorm's weight, ScaledStdConv2d's gain) and
    nothing changed; strict=False: torch's partial load and torch's returned keys."""
    for key in _source(layer):
        state = _source(layer)
        del state[key]
        check_against_torch(_target(layer), state)
        check_against_torch(_target(layer), state, strict=False, must_fail=False)


@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_an_unexpected_key_changes_nothing(layer):
    state = _source(layer)
    state["surprise"] = torch.zeros(3)
    error, torch_changed_it = check_against_torch(_target(layer), state, must_fail=True)
    assert 'Unexpected key(s) in state_dict: "surprise"' in error[1]
    assert torch_changed_it or layer.name == "ResidualAct"
    check_against_torch(_target(layer), state, strict=False, must_fail=False)


@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_a_good_load_is_torchs(layer):
    check_against_torch(_target(layer), _source(layer), must_fail=False)
    check_against_torch(_target(layer), _source(layer), assign=True, must_fail=False)


@pytest.mark.parametrize("layer", TWINS, ids=str)
def test_drop_ins_load_and_fail_like_their_torch_twin(layer):
    ours, theirs = _target(layer), layer.twin(C)
    theirs.load_state_dict(ours.state_dict())
    good = _source(layer)
    ours.load_state_dict(good)
    theirs.load_state_dict(good)
    assert {k: _bits(v) for k, v in ours.state_dict().items()} == {k: _bits(v) for k, v in theirs.state_dict().items()}
    bad = copy.copy(good)
    bad[list(bad)[-1]] = _wrong_shape(bad[list(bad)[-1]])
    bad["surprise"] = torch.zeros(1)
    assert _load(ours, bad)[1] == _load(theirs, bad)[1] is not None


COUNTED = [layer for layer in WITH_STATE if "num_batches_tracked" in layer.build(C).state_dict()]


@pytest.mark.parametrize("layer", COUNTED, ids=str)
def test_old_checkpoints_without_the_counter_load_as_in_torch(layer):
    """torch's legacy rule: no ``num_batches_tracked`` and no version keeps the counter (a batch norm's, and
    FrozenBatchNorm's default); with the version the state_dict carries, torch's verdict."""
    state = _source(layer)
    del state["num_batches_tracked"]
    check_against_torch(_target(layer), OrderedDict(state), must_fail=False)
    check_against_torch(_target(layer), state)


def test_a_versioned_checkpoint_without_the_counter_fails_and_changes_nothing():
    state = _randomized(nkn.BatchNorm2d(C), seed=1).state_dict()
    del state["num_batches_tracked"]
    error, torch_changed_it = check_against_torch(_randomized(nkn.BatchNorm2d(C), seed=0), state, must_fail=True)
    assert 'Missing key(s) in state_dict: "num_batches_tracked"' in error[1] and torch_changed_it


def test_assign_and_swap_modes_restore_the_same_objects():
    layer = next(layer for layer in LAYERS if layer.name == "BatchNorm2d")
    state = _source(layer)
    state["running_var"] = _wrong_shape(state["running_var"])
    check_against_torch(_target(layer), state, assign=True, must_fail=True)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        check_against_torch(_target(layer), state, must_fail=True)
        check_against_torch(_target(layer), state, assign=True, must_fail=True)
        check_against_torch(_target(layer), _source(layer), assign=True, must_fail=False)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def test_called_by_another_loader_the_layer_keeps_its_own_keys_atomic():
    """A loader calling ``_load_from_state_dict`` itself (as torch does, always with ``strict=True``): an error
    takes the layer's writes back; missing keys are only reported, the caller decides (a partial load stays)."""
    layer = next(layer for layer in LAYERS if layer.name == "BatchNorm2d")
    target, state = _target(layer), dict(_source(layer))
    state["running_var"] = _wrong_shape(state["running_var"])
    before, errors = fingerprint(target), []
    target._load_from_state_dict(state, "", {}, True, [], [], errors)
    assert len(errors) == 1 and fingerprint(target) == before
    del state["running_var"]
    missing, errors = [], []
    target._load_from_state_dict(dict(state), "", {}, True, missing, [], errors)
    assert missing == ["running_var"] and not errors
    reference = _target(layer)  # the same values as target had
    with torch_semantics():
        reference._load_from_state_dict(dict(state), "", {}, True, [], [], [])
    assert fingerprint(target) == fingerprint(reference) != before


# --- inside a model ----------------------------------------------------------------------------------------------

def _model(layer: Layer) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), layer.build(C), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("where", ["sibling before", "sibling after", "the layer"])
@pytest.mark.parametrize("layer", WITH_STATE, ids=str)
def test_a_failed_model_load_leaves_the_layer_unchanged(layer, where):
    target = _randomized(_model(layer), seed=0)
    state = _randomized(_model(layer), seed=1).state_dict()
    key = {"sibling before": "0.weight", "sibling after": "2.bias",
           "the layer": [k for k in state if k.startswith("1.")][-1]}[where]
    state[key] = _wrong_shape(state[key])
    before = fingerprint(target[1])
    with torch_semantics():
        reference = copy.deepcopy(target)
        expected = _load(reference, state)[1]
    assert expected is not None and fingerprint(reference[1]) != before
    assert _load(target, state)[1] == expected
    assert fingerprint(target[1]) == before
    assert target._load_state_dict_post_hooks == OrderedDict()


@pytest.mark.parametrize("layer", WITH_STATE, ids=str)
def test_a_model_load_that_succeeds_is_torchs(layer):
    for strict in (True, False):
        target = _randomized(_model(layer), seed=0)
        state = _randomized(_model(layer), seed=1).state_dict()
        if not strict:
            del state["2.bias"], state[[k for k in state if k.startswith("1.")][0]]
        check_against_torch(target, state, strict=strict, must_fail=False)


def test_shared_layers_and_several_layers_are_all_restored():
    bn = _randomized(nkn.BatchNorm2d(C), seed=0)
    target = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, _randomized(nkn.GroupNorm(2, C), seed=2),
                                 torch.nn.Linear(2, 2))
    state = copy.deepcopy(target).state_dict()
    for value in state.values():
        value.add_(1)
    state["4.weight"] = _wrong_shape(state["4.weight"])  # torch's Linear: torch still writes its bias
    before = [fingerprint(target[i]) for i in (0, 3)]
    assert _load(target, state)[1][0] is RuntimeError
    assert [fingerprint(target[i]) for i in (0, 3)] == before
    assert not torch.equal(target[4].bias, state["4.bias"] - 1)


def test_an_exception_during_a_layers_load_restores_the_layers_loaded_before():
    first, second = _randomized(nkn.BatchNorm2d(C), seed=0), _randomized(nkn.BatchNorm2d(C), seed=2)
    target = torch.nn.Sequential(first, second)
    state = _randomized(torch.nn.Sequential(nkn.BatchNorm2d(C), nkn.BatchNorm2d(C)), seed=1).state_dict()

    def refuse(module, *args):
        raise ValueError("this hook refuses the checkpoint")

    second.register_load_state_dict_pre_hook(refuse)
    before = fingerprint(target)
    with pytest.raises(ValueError, match="refuses"):
        target.load_state_dict(state)
    assert fingerprint(target) == before
    assert target._load_state_dict_post_hooks == OrderedDict()


def test_user_post_hooks_still_run_and_may_clear_missing_keys():
    """torch lets a root post-hook edit the incompatible keys (to accept a missing key): the load then succeeds
    and must be torch's partial load, and the hook sees the loaded values."""
    target = torch.nn.Sequential(_randomized(nkn.BatchNorm2d(C), seed=0))
    state = _randomized(torch.nn.Sequential(nkn.BatchNorm2d(C)), seed=1).state_dict()
    del state["0.bias"]
    seen = []

    def accept_missing_bias(module, incompatible):
        seen.append(module[0].running_mean.clone())
        incompatible.missing_keys.remove("0.bias")

    target.register_load_state_dict_post_hook(accept_missing_bias)
    check_against_torch(target, state, must_fail=False)
    assert torch.equal(seen[-1], state["0.running_mean"])
