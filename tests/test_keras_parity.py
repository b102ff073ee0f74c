"""normkit against the real Keras 3 ``BatchNormalization`` (torch backend): outputs, moving statistics, gradients."""

from __future__ import annotations

import os

import pytest
import torch

import normkit
import normkit.functional as F
from normkit.compat import keras_batch_norm, load_keras_weights, momentum_from_keras

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend", allow_module_level=True)

EPS = 1e-3
X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
# keras 3.15's Variable.__array__ (used by get_weights) lacks numpy 2's `copy` argument
NUMPY_COPY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


def close(actual, expected, what=""):
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def keras_state(layer) -> dict[str, torch.Tensor]:
    return {v.name: v.value.detach().clone() for v in layer.weights}


def channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-1, 1)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1)


def random_weights(c: int, gen: torch.Generator) -> list[torch.Tensor]:
    """gamma, beta, moving_mean, moving_variance, all away from their initial values."""
    return [1 + 0.3 * torch.randn(c, generator=gen), 0.3 * torch.randn(c, generator=gen),
            torch.randn(c, generator=gen), 0.5 + torch.rand(c, generator=gen)]


def batch(shape, gen: torch.Generator) -> torch.Tensor:
    """Channels-last data with a different mean and spread per channel."""
    c = shape[-1]
    return torch.randn(shape, generator=gen) * (0.5 + 2 * torch.rand(c, generator=gen)) + torch.randn(c, generator=gen)


# --- (a) the measured reference numbers -----------------------------------------------------------------------


def test_reference_numbers_train_then_inference():
    """Research notes, semantics section 6, items 18 and 19."""
    layer = keras.layers.BatchNormalization()
    bn = normkit.BatchNorm1d(1, eps=EPS, momentum=momentum_from_keras(0.99), running_var="biased")
    expected = torch.tensor([[-1.341104], [-0.447035], [0.447035], [1.341104]])
    for y in (layer(X, training=True), bn(X)):
        torch.testing.assert_close(y.detach(), expected, atol=1e-6, rtol=0)
    for moving, running, value in ((layer.moving_mean, bn.running_mean, 0.025), (layer.moving_variance,
                                                                                 bn.running_var, 1.0025)):
        torch.testing.assert_close(moving.value.detach(), torch.tensor([value]))
        torch.testing.assert_close(running, torch.tensor([value]))
    expected = torch.tensor([[0.973298], [1.971553], [2.969807], [3.968061]])
    for y in (layer(X), bn.eval()(X)):
        torch.testing.assert_close(y.detach(), expected, atol=1e-6, rtol=0)


def test_reference_numbers_momentum_zero_stores_biased_variance():
    """Item 21: Keras momentum 0 keeps the last batch's biased variance, 1.25 (torch's unbiased would be 1.667)."""
    layer = keras.layers.BatchNormalization(momentum=0.0)
    bn = normkit.BatchNorm1d(1, eps=EPS, momentum=momentum_from_keras(0.0), running_var="biased")
    layer(X, training=True)
    bn(X)
    assert (layer.moving_mean.value.item(), layer.moving_variance.value.item()) == (2.5, 1.25)
    assert (bn.running_mean.item(), bn.running_var.item()) == (2.5, 1.25)


def test_trainable_false_is_eval():
    """Item 20: Keras' trainable=False runs inference even with training=True; in torch that is .eval()."""
    layer = keras.layers.BatchNormalization()
    layer.trainable = False
    bn = keras_batch_norm(1, dim=1).eval()
    close(bn(X), layer(X, training=True))
    assert bn.running_mean.item() == layer.moving_mean.value.item() == 0.0


def test_one_value_per_channel_is_a_documented_difference():
    """Item 21: Keras normalizes a single value per channel to 0 (variance 0); normkit keeps torch's error."""
    x = torch.tensor([[1.0, 2.0]])
    layer = keras.layers.BatchNormalization()
    assert torch.equal(layer(x, training=True).detach(), torch.zeros(1, 2))
    torch.testing.assert_close(layer.moving_variance.value.detach(), torch.full((2,), 0.99))
    bn = keras_batch_norm(2, dim=1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(x)


# --- (b) training steps on channels-last data, module and functional ------------------------------------------


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_training_steps_and_inference_match_keras(momentum):
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5, 4, 3)
    gamma, beta, mean, var = random_weights(shape[-1], gen)
    layer = keras.layers.BatchNormalization(momentum=momentum, epsilon=EPS)
    layer.build(shape)
    layer.set_weights([t.numpy() for t in (gamma, beta, mean, var)])
    bn = normkit.BatchNorm2d(shape[-1], eps=EPS, momentum=momentum_from_keras(momentum), running_var="biased")
    load_keras_weights(bn, gamma, beta, mean, var)
    running_mean, running_var = mean.clone(), var.clone()
    weight, bias = bn.weight.detach(), bn.bias.detach()

    def functional(x, training):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, bn.momentum, EPS,
                            running_var_mode="biased", channel_dim=-1)

    for step in range(4):
        x = batch(shape, gen)
        expected = layer(x, training=True)
        close(channels_last(bn(channels_first(x))), expected, f"module output, step {step}")
        close(functional(x, True), expected, f"functional output, step {step}")
        moving = keras_state(layer)
        for ours in ((bn.running_mean, bn.running_var), (running_mean, running_var)):
            close(ours[0], moving["moving_mean"], f"running_mean, step {step}")
            close(ours[1], moving["moving_variance"], f"running_var, step {step}")
    bn.eval()
    x = batch(shape, gen)
    expected = layer(x, training=False)
    close(channels_last(bn(channels_first(x))), expected, "module inference")
    close(functional(x, False), expected, "functional inference")
    assert int(bn.num_batches_tracked) == 4


# --- (c) weights exported by a Keras layer ---------------------------------------------------------------------


@pytest.mark.filterwarnings(NUMPY_COPY_WARNING)
@pytest.mark.parametrize(("dim", "shape"), [(1, (16, 3)), (1, (4, 7, 3)), (2, (4, 5, 5, 3)), (3, (2, 3, 4, 2, 3))])
@pytest.mark.parametrize(("center", "scale"), [(True, True), (True, False), (False, True), (False, False)])
def test_weights_from_get_weights(dim, shape, center, scale):
    gen = torch.Generator().manual_seed(1)
    layer = keras.layers.BatchNormalization(center=center, scale=scale)
    layer.build(shape)
    kept = (scale, center, True, True)
    layer.set_weights([t.numpy() for t, keep in zip(random_weights(shape[-1], gen), kept, strict=True) if keep])
    for _ in range(2):
        layer(batch(shape, gen), training=True)
    names = [v.name for v in layer.weights]
    weights = dict(zip(names, layer.get_weights(), strict=True))
    if center and scale:
        assert names == ["gamma", "beta", "moving_mean", "moving_variance"]
        loaded = layer.get_weights()
    else:
        loaded = [weights.get("gamma"), weights.get("beta"), weights["moving_mean"], weights["moving_variance"]]
    bn = keras_batch_norm(shape[-1], dim=dim, center=center, scale=scale)
    load_keras_weights(bn, *loaded).eval()
    x = batch(shape, gen)
    close(channels_last(bn(channels_first(x))), layer(x), "inference after loading")
    bn.train()
    for step in range(2):
        x = batch(shape, gen)
        close(channels_last(bn(channels_first(x))), layer(x, training=True), f"training step {step}")
    moving = keras_state(layer)
    close(bn.running_mean, moving["moving_mean"], "running_mean")
    close(bn.running_var, moving["moving_variance"], "running_var")


# --- (d) gradients through Keras' torch backend ----------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_keras(training):
    gen = torch.Generator().manual_seed(2)
    shape = (8, 3, 3, 4)
    gamma, beta, mean, var = random_weights(shape[-1], gen)
    layer = keras.layers.BatchNormalization()
    layer.build(shape)
    layer.set_weights([t.numpy() for t in (gamma, beta, mean, var)])
    bn = load_keras_weights(keras_batch_norm(shape[-1]).train(training), gamma, beta, mean, var)
    x = batch(shape, gen)
    upstream = torch.randn(shape, generator=gen)

    xk = x.clone().requires_grad_()
    yk = layer(xk, training=training)
    expected = torch.autograd.grad((yk * upstream).sum(), [xk, layer.gamma.value, layer.beta.value])

    xn = x.clone().requires_grad_()
    yn = channels_last(bn(channels_first(xn)))
    ours = torch.autograd.grad((yn * upstream).sum(), [xn, bn.weight, bn.bias])

    close(yn, yk, "output")
    for name, a, b in zip(("dx", "dgamma", "dbeta"), ours, expected, strict=True):
        close(a, b, name)

    xf = x.clone().requires_grad_()
    yf = F.batch_norm(xf, mean.clone(), var.clone(), bn.weight, bn.bias, training, bn.momentum, EPS,
                      running_var_mode="biased", channel_dim=-1)
    close(torch.autograd.grad((yf * upstream).sum(), xf)[0], expected[0], "functional dx")
