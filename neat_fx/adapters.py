"""The NEAT adapter: the math of one adapted weight (docs/design.md, "The math").

    H  = σ(Wᵀ A)               A: (d_out, r)       H: (d_in, r)
         (depth > 2: H goes through (depth-2)/2 encoders and as many decoders, r×r each,
          with σ after each and the encoder inputs added back after the mirrored decoders)
    y' = y + s·(x H) Bᵀ        B: (d_out, r), zero at init
    ΔW = s·B Hᵀ                (d_out, d_in)

The weight arrives in the layout its op uses: "out_in" (nn.Linear, `x @ W.T`) or "in_out"
(GPT-2 Conv1D, `x @ W`); `neat_delta` returns ΔW in that same layout so fold can add it. The math is batched
over leading dimensions: routed experts stored as one (E, ·, ·) parameter get A, B and the r×r layers with a
leading expert dimension, one NEAT per expert (`experts=E`; neat_fx.experts). The form
says which dimension of the activation meets the weight (neat_fx.ops): "right" for x·M, "left" for
M·x, or an einsum pair. The r×r layers follow PEFT's PEANuT layout (`h @ E.T`), so checkpoints map
one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import activation_fn
from .ops import LAYOUTS


def neat_hidden(weight, A, encoders, decoders, activation: str, layout: str, dtype=None) -> torch.Tensor:
    """H = σ(Wᵀ A) through the r×r encoder/decoder stack, (d_in, r), in `dtype` (default: A's)."""
    dtype = dtype or A.dtype
    w = weight.to(dtype)
    w_in_out = w.mT if layout == "out_in" else w  # Wᵀ: (…, d_in, d_out)
    act = activation_fn(activation)
    h = act(w_in_out @ A.to(dtype))
    residuals = []
    for enc in encoders:
        residuals.append(h)
        h = act(h @ enc.to(dtype).mT)
    for dec, res in zip(decoders, reversed(residuals)):
        h = act(h @ dec.to(dtype).mT) + res
    return h


def neat_apply(
    x, weight, y, A, B, encoders, decoders, activation: str, scale: float, layout: str, form: str = "right"
) -> torch.Tensor:
    """y + ΔW applied to x in the op's form, factorised: ΔW is never materialised.
    "right": y + s·(x H) Bᵀ;  "left": y + s·B (Hᵀ x);  "einsum:EQ_H;EQ_B": y + s·einsum(EQ_B, einsum(EQ_H, x, H), B).
    The scale multiplies the thin (tokens, r) product, not the (tokens, d_out) one."""
    h = neat_hidden(weight, A, encoders, decoders, activation, layout)
    x = x.to(h.dtype)
    if form == "right":
        return y + ((x @ h) * scale @ B.t()).to(y.dtype)
    if form == "left":
        return y + (B @ ((h.t() @ x) * scale)).to(y.dtype)
    if form.startswith("einsum:"):
        eq_h, eq_b = form[len("einsum:") :].split(";")
        return y + torch.einsum(eq_b, torch.einsum(eq_h, x, h) * scale, B).to(y.dtype)
    raise ValueError(f"unknown adapter form {form!r}; expected 'right', 'left' or 'einsum:EQ_H;EQ_B'")


def neat_delta(
    weight, A, B, encoders, decoders, activation: str, scale: float, layout: str, dtype=torch.float32
) -> torch.Tensor:
    """ΔW = s·B Hᵀ in `dtype`, in the layout of `weight` (which must be W0)."""
    h = neat_hidden(weight, A, encoders, decoders, activation, layout, dtype)
    delta = scale * (B.to(dtype) @ h.mT)  # (…, d_out, d_in)
    return delta if layout == "out_in" else delta.mT


@torch.no_grad()
def neat_fold(weight, A, B, encoders, decoders, activation: str, scale: float, layout: str) -> torch.Tensor:
    """W0 + ΔW in W0's dtype, ΔW computed in float32 from `weight` (which must be W0): what fold, merge and the
    compile backend write. (docs/design.md, "The fold invariant")"""
    return (weight.float() + neat_delta(weight, A, B, encoders, decoders, activation, scale, layout)).to(weight.dtype)


# The adapter as one operator, for torch.compile graphs (see NeatAdapter.forward). CompositeImplicitAutograd:
# autograd, fake tensors and every backend other than "neat" see the decomposition above.
_LIB = torch.library.Library("neat_fx", "DEF")
_LIB.define(
    "adapter(Tensor x, Tensor weight, Tensor y, Tensor A, Tensor B, Tensor[] encoders, Tensor[] decoders, "
    'str activation, float scale, str layout, str form="right") -> Tensor'
)
_LIB.impl("adapter", neat_apply, "CompositeImplicitAutograd")


class NeatAdapter(nn.Module):
    """Trainable adapter of one weight. Called as `adapter(x, W, y) -> y + s·(x H) Bᵀ`."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        hidden_layers: int,
        activation: str,
        scale: float,
        layout: str,
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: torch.Generator | None = None,
        experts: int = 0,
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.experts = int(experts)  # 0: one 2-D weight; E: E experts stored as one (E, ·, ·) weight
        self.layout = layout
        self.activation = activation
        self.scale = float(scale)
        lead = (self.experts,) if self.experts else ()
        self.A = nn.Parameter(torch.empty(*lead, d_out, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(*lead, d_out, rank, dtype=dtype, device=device))
        self.encoders = nn.ParameterList(
            [nn.Parameter(torch.empty(*lead, rank, rank, dtype=dtype, device=device)) for _ in range(hidden_layers)]
        )
        self.decoders = nn.ParameterList(
            [nn.Parameter(torch.empty(*lead, rank, rank, dtype=dtype, device=device)) for _ in range(hidden_layers)]
        )
        self.reset_parameters(generator)

    @property
    def hidden_layers(self) -> int:
        return len(self.encoders)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        # Kaiming-uniform with a=√5 on a (fan_out=r, fan_in) matrix, as nn.Linear and PEFT do:
        # bound = 1/√fan_in, with fan_in = d_out for A and r for the r×r layers.
        def uniform_(t: torch.Tensor, fan_in: int):
            bound = 1.0 / math.sqrt(fan_in)
            sample = torch.rand(t.shape, generator=generator, dtype=torch.float32, device="cpu")
            t.copy_((sample * 2 - 1) * bound)

        uniform_(self.A, self.d_out)
        for p in list(self.encoders) + list(self.decoders):
            uniform_(p, self.rank)
        self.B.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, form: str = "right") -> torch.Tensor:
        args = (
            x,
            weight,
            y,
            self.A,
            self.B,
            list(self.encoders),
            list(self.decoders),
            self.activation,
            self.scale,
            self.layout,
            form,
        )
        if torch.compiler.is_compiling():
            # One opaque node per site in the graph torch.compile hands its backend: the "neat" backend
            # lowers it (fold, or the cheaper training form); any other backend decomposes it like eager.
            return torch.ops.neat_fx.adapter(*args)
        return neat_apply(*args)

    def tensors(self) -> tuple:
        """(A, B, encoders, decoders): the arguments `neat_delta` / `neat_fold` take after the weight."""
        return self.A, self.B, list(self.encoders), list(self.decoders)

    def folded_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW in W0's dtype (`weight` must be W0)."""
        return neat_fold(weight, *self.tensors(), self.activation, self.scale, self.layout)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in float32, in the layout of `weight` (computed from `weight`, which must be W0)."""
        return neat_delta(
            weight, self.A, self.B, list(self.encoders), list(self.decoders), self.activation, self.scale, self.layout
        )

    def extra_repr(self) -> str:
        return (
            (f"experts={self.experts}, " if self.experts else "")
            + f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, hidden_layers={self.hidden_layers}, "
            f"activation={self.activation}, scale={self.scale}, layout={self.layout}"
        )
