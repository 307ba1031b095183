"""Test helpers: an independent eager NEAT reference and output comparison."""

from __future__ import annotations

import copy

import torch
from torch.utils import _pytree as pytree

ACT = {
    "relu": torch.relu,
    "gelu": lambda t: torch.nn.functional.gelu(t),
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sin": torch.sin,
    "identity": lambda t: t,
}


def ref_delta(w_out_in, A, B, encoders, decoders, activation, scale):
    """ΔW = s·B·Hᵀ with H = σ(Wᵀ A) and mirrored residual r×r layers — written from docs/design.md ("The math"),
    in float64, sharing no code with neat_fx."""
    act = ACT[activation]
    w = w_out_in.double()
    h = act(w.t() @ A.double())
    saved = []
    for e in encoders:
        saved.append(h)
        h = act(h @ e.double().t())
    for i, d in enumerate(decoders):
        h = act(h @ d.double().t()) + saved[len(saved) - 1 - i]
    return scale * (B.double() @ h.t())


def randomize_adapters(nm, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in nm.adapters.values():
            for p in ad.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reference_model(model, nm):
    """A deep copy of `model` whose adapted weights are replaced by W0 + ΔW from `ref_delta`."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for s in nm.sites():
            ad = nm.adapters[s.key]
            w = model.get_parameter(s.name)
            w_out_in = w if s.layout == "out_in" else w.t()
            d = ref_delta(w_out_in, ad.A, ad.B, list(ad.encoders), list(ad.decoders), ad.activation, ad.scale)
            if s.layout == "in_out":
                d = d.t()
            ref.get_parameter(s.name).copy_((w.double() + d).to(w.dtype))
        for key, name in nm.trainable_names.items():
            ref.get_parameter(name).copy_(nm.trainable[key])
    return ref


def call(m, inputs):
    return m(*inputs) if isinstance(inputs, tuple) else m(**inputs)


def tensors(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_diff(a, b):
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb), f"outputs hold {len(ta)} vs {len(tb)} tensors"
    worst = 0.0
    for x, y in zip(ta, tb):
        assert x.shape == y.shape, f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
    return worst


def op_counts(graph, include_modules=False):
    from collections import Counter

    ops = ("call_function", "call_module") if include_modules else ("call_function",)
    return Counter(str(n.target) for n in graph.nodes if n.op in ops)


def rel_diff(a, b):
    """max |a - b| / max(1, max |b|): differences relative to the output's scale."""
    scale = max([1.0] + [float(t.abs().max()) for t in tensors(b) if t.is_floating_point() and t.numel()])
    return max_diff(a, b) / scale


def three_bert_adapters(root):
    """Three adapters of one BERT (zoo.bert) that differ in everything a multi-adapter server must absorb: sites,
    rank, depth, activation, a head trained in full ('a'), PEFT's PEANuT format ('c'); saved under `root`.
    Returns (model, example, other, {name: its NeatModule in eval})."""
    import neat_fx

    import zoo

    model, example, other, _ = zoo.bert()
    model.eval()
    a = neat_fx.transform(model, ["*query", "*value"], example, rank=4, modes=("eval",), trainable=["classifier*"])
    randomize_adapters(a, std=0.2, seed=1)
    with torch.no_grad():
        for p in a.trainable.parameters():
            p.add_(0.3)
    b = neat_fx.transform(model, ["*value", "*dense"], example, rank=2, depth=4, activation="gelu", modes=("eval",))
    randomize_adapters(b, std=0.2, seed=2)
    c = neat_fx.transform(model, ["*key"], example, rank=3, modes=("eval",), activation="silu")
    randomize_adapters(c, std=0.2, seed=3)
    neat_fx.save_adapters(a, root / "a")
    neat_fx.save_adapters(b, root / "b")
    neat_fx.save_adapters(c, root / "c", format="peft")
    return model, example, other, {"a": a.eval(), "b": b.eval(), "c": c.eval()}
