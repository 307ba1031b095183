"""The NEAT math of one adapter against the hand-written float64 reference (docs/design.md, "The math")."""

import pytest
import torch

from neat_fx.adapters import NeatAdapter
from neat_fx.config import ACTIVATIONS, NeatConfig
from neat_fx.errors import ConfigError

from helpers import ref_delta


def make(d_in=12, d_out=20, rank=4, depth=2, activation="relu", scale=0.7, layout="out_in", seed=0):
    cfg = NeatConfig(patterns=("*",), rank=rank, depth=depth, activation=activation, scale=scale)
    ad = NeatAdapter(
        d_in,
        d_out,
        rank,
        cfg.hidden_layers,
        activation,
        scale,
        layout,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        ad.B.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return ad


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("depth", [2, 4, 6])
def test_delta_weight_matches_reference(activation, depth):
    ad = make(depth=depth, activation=activation)
    w = torch.randn(20, 12, dtype=torch.float64)
    ref = ref_delta(w, ad.A, ad.B, list(ad.encoders), list(ad.decoders), activation, 0.7)
    assert torch.allclose(ad.delta_weight(w).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("depth", [2, 4])
def test_factorised_forward_equals_materialised(layout, depth):
    ad = make(depth=depth, activation="sin", layout=layout)
    w_out_in = torch.randn(20, 12, dtype=torch.float64)
    w = w_out_in if layout == "out_in" else w_out_in.t().contiguous()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y = x @ w_out_in.t()
    out = ad(x, w, y)
    delta = ref_delta(w_out_in, ad.A, ad.B, list(ad.encoders), list(ad.decoders), "sin", 0.7)
    assert torch.allclose(out, x @ (w_out_in + delta).t(), rtol=1e-10, atol=1e-10)
    # delta_weight comes back in the weight's own layout
    d = ad.delta_weight(w).double()
    assert d.shape == w.shape


def test_zero_init_B_and_kaiming_bounds():
    ad = NeatAdapter(64, 96, 8, 1, "relu", 1.0, "out_in")
    assert torch.count_nonzero(ad.B) == 0
    assert ad.A.abs().max() <= 1 / 96**0.5 and ad.A.abs().max() > 0.5 / 96**0.5
    assert ad.encoders[0].abs().max() <= 1 / 8**0.5
    x, w = torch.randn(2, 64), torch.randn(96, 64)
    y = x @ w.t()
    assert torch.equal(ad(x, w, y), y)


@pytest.mark.parametrize("depth,rank", [(2, 8), (4, 8), (6, 4)])
def test_parameter_count(depth, rank):
    d_in, d_out = 32, 48
    ad = NeatAdapter(d_in, d_out, rank, (depth - 2) // 2, "relu", 1.0, "out_in")
    assert ad.num_parameters() == 2 * rank * d_out + (depth - 2) * rank * rank


def test_half_precision_weight_uses_float32_adapter():
    ad = make(activation="gelu")
    ad = ad.float()
    w = torch.randn(20, 12).to(torch.bfloat16)
    x = torch.randn(4, 12).to(torch.bfloat16)
    y = x @ w.t()
    out = ad(x, w, y)
    assert out.dtype == torch.bfloat16
    d = ad.delta_weight(w)
    assert d.dtype == torch.float32
    ref = ref_delta(w.float(), ad.A, ad.B, [], [], "gelu", 0.7)
    assert torch.allclose(d.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=0),
        dict(depth=3),
        dict(depth=0),
        dict(activation="swish"),
        dict(scale="big"),
        dict(capture="jit"),
        dict(modes=("test",)),
        dict(rank=2.5),
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        NeatConfig(patterns=("*",), **kwargs)
