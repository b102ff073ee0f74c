"""Property-based parity with torch.nn.BatchNorm*: outputs, gradients and running statistics, fp32 within 1e-5."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit

from helpers import assert_same_results, run_pair

CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@st.composite
def configurations(draw):
    rank = draw(st.sampled_from(sorted(CLASSES)))
    channels = draw(st.integers(1, 6))
    spatial = draw(st.lists(st.integers(1, 5), min_size=rank - 2, max_size=rank - 2))
    batch = draw(st.integers(2, 6))
    return {
        "shape": (batch, channels, *spatial),
        "cls": CLASSES[rank],
        "momentum": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "affine": draw(st.booleans()),
        "track_running_stats": draw(st.booleans()),
        "channels_last": rank in CHANNELS_LAST and draw(st.booleans()),
        "train": draw(st.booleans()),
        "steps": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
        "scale": draw(st.sampled_from([1e-2, 1.0, 30.0])),
        "offset": draw(st.sampled_from([0.0, 3.0, -50.0])),
    }


@settings(max_examples=150, deadline=None)
@given(configurations())
def test_parity_with_torch(config):
    kwargs = {k: config[k] for k in ("momentum", "eps", "affine", "track_running_stats")}
    channels = config["shape"][1]
    ours = getattr(normkit, config["cls"])(channels, **kwargs)
    theirs = getattr(torch.nn, config["cls"])(channels, **kwargs)
    gen = torch.Generator().manual_seed(config["seed"])
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    ours.train(config["train"])
    theirs.train(config["train"])
    for step in range(config["steps"]):
        x = torch.randn(config["shape"], generator=gen) * config["scale"] + config["offset"]
        if config["channels_last"]:
            x = x.contiguous(memory_format=CHANNELS_LAST[x.dim()])
        mine, ref = run_pair(ours, theirs, x, grad_seed=config["seed"] + step)
        # Folding BN into y = x * scale + shift in fp32 (as torch does too) loses |mean| / std ulps: the tolerance
        # grows with that condition number and is 1e-5 for well-conditioned inputs. dx scales with 1 / std.
        condition = 1.0 + abs(config["offset"]) / config["scale"] / 10
        mine["dx"], ref["dx"] = mine["dx"] * config["scale"], ref["dx"] * config["scale"]
        stats = ("running_mean", "running_var", "num_batches_tracked")
        assert_same_results({k: v for k, v in mine.items() if k not in (*stats, "dw")},
                            {k: v for k, v in ref.items() if k not in (*stats, "dw")}, atol=1e-5 * condition,
                            rtol=1e-5)
        # dw sums dy * x_hat over every value of a channel; in eval x_hat is (x - running_mean) / running_std,
        # of the input's own magnitude, so fp32 summation error grows with count * magnitude.
        count = x.numel() // channels
        magnitude = 1.0 if config["train"] else (abs(config["offset"]) + 3 * config["scale"]) / 0.7
        assert_same_results({"dw": mine["dw"]}, {"dw": ref["dw"]}, rtol=1e-5,
                            atol=1e-5 * condition + 1e-7 * count * magnitude)
        assert_same_results({k: mine[k] for k in stats}, {k: ref[k] for k in stats}, atol=1e-6, rtol=1e-5)
