"""Routed experts: one NEAT per expert on a 3-D stack of expert weights (docs/design.md, "MoE experts").

Transformers ≥ 5 keeps a MoE layer's routed experts as 3-D parameters (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)) read by a per-expert matmul (neat_fx.ops.EXPERT_OPS): "batched_mm" indexes the
stack by the expert id of every (token, expert) pair and runs `bmm`; "grouped_mm" sorts the pairs by expert and
runs `grouped_mm` with offsets on the whole stack (through `transpose(-2, -1)` for the (E, d_out, d_in) layout).

Each expert e gets its own NEAT, batched over e: A, B (E, d_out, r) and the r×r layers (E, r, r),
H_e = σ(W_eᵀ A_e) and ΔW_e = s·B_e H_eᵀ. The update is applied in activation space, never materialising ΔW:
the adapter returns the two factors of ΔW as stacks in the stored layout (`(Hᵀ, s·B)` for (E, d_out, d_in),
`(H, s·Bᵀ)` for (E, d_in, d_out)), and the graph runs the same per-expert op twice more on them, each factor
passed through the same index by expert ids and transposes as the weight:

    y = op(x, path(W))      →      y + op(op(x, path(F₁)), path(F₂))

which is exact because every table op is bilinear per expert: op(x, W + F₁F₂) = op(x, W) + op(op(x, F₁), F₂).
Routing stays the model's own and data-dependent (the ids and offsets are the graph's); an expert no token is
routed to gets no gradient. `fold` and `merge_into` write `W0 + ΔW` (3-D, from `ExpertsAdapter.folded_weight`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .adapters import NeatAdapter, neat_hidden
from .ops import ExpertUse

#: node.meta key on every node `insert` adds (value: the adapter key); fold removes them all.
EXPERT_NODE = "neat_expert"
#: node.meta key on the `y + Δy` node `insert` adds (value: the adapter key); fold replaces it by y.
EXPERT_OUT = "neat_expert_out"
#: node.meta key on the first node reading the stack on each expert path: (adapter key, argument index of the
#: stack), where fold puts the folded stack.
EXPERT_HEAD = "neat_expert_head"


class ExpertsAdapter(NeatAdapter):
    """E NEAT adapters, one per expert of an (E, ·, ·) weight stack. Called as `adapter(W) -> (F₁, F₂)`: the two
    factors of ΔW as stacks in W's stored layout (see the module docstring); `folded_weight(W0)` is W0 + ΔW."""

    def __init__(
        self,
        experts: int,
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
    ):
        if experts < 1:
            raise ValueError(f"experts must be ≥ 1, got {experts}")
        super().__init__(
            d_in, d_out, rank, hidden_layers, activation, scale, layout, dtype, device, generator, experts=experts
        )

    def forward(self, weight: torch.Tensor, align: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`align`: zero-pad r so a factor's rows are whole 16-byte multiples in W's dtype (torch's grouped_mm
        kernel refuses other strides: r = 4 in bf16 would not run). The zeros change no product."""
        h = neat_hidden(weight, self.A, list(self.encoders), list(self.decoders), self.activation, self.layout)
        sb = self.B * self.scale  # (E, d_out, r)
        if align:
            per = max(1, 16 // weight.element_size())
            pad = -self.rank % per
            if pad:
                h, sb = torch.nn.functional.pad(h, (0, pad)), torch.nn.functional.pad(sb, (0, pad))
        if self.layout == "out_in":  # W_e (d_out, d_in) = … + (s·B_e) H_eᵀ
            return h.mT, sb
        return h, sb.mT  # W_e (d_in, d_out) = … + H_e (s·B_e)ᵀ


def insert(graph: fx.Graph, uses: list[ExpertUse], key: str):
    """Add the update of adapter `key` after every per-expert op in `uses` (all in `graph`, all reading one
    stack): one adapter call per graph, before the first reader of the stack; then, per op, the op on
    (x, path(F₁)) and on (that, path(F₂)), added to its output."""
    if not uses:
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min((u.head for u in uses), key=order.__getitem__)
    weight = uses[0].weight
    align = any(u.kind == "grouped_mm" for u in uses)
    with graph.inserting_before(first):
        factors = graph.call_module("adapters." + key, (weight, align) if align else (weight,))
        f1 = graph.call_function(operator.getitem, (factors, 0))
        f2 = graph.call_function(operator.getitem, (factors, 1))
    _mark([factors, f1, f2], key, first)
    for use in uses:
        y = use.node
        head_arg = 0 if use.path else use.weight_arg
        use.head.meta[EXPERT_HEAD] = (key, head_arg)
        added = []
        with graph.inserting_before(y.next):
            x = y.args[use.x_arg]
            z = _replay(graph, use, f1, x, added)
            dy = _replay(graph, use, f2, z, added)
            out = graph.call_function(torch.ops.aten.add.Tensor, (y, dy))
        added.append(out)
        out.meta[EXPERT_OUT] = key
        y.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        _mark(added, key, y)


def _mark(nodes: list[fx.Node], key: str, like: fx.Node):
    """Flag the nodes `insert` added, in the module (nn_module_stack) of the op they adapt: a graph split into
    blocks (neat_fx.blocks) keeps them with it."""
    stack = like.meta.get("nn_module_stack")
    for n in nodes:
        n.meta[EXPERT_NODE] = key
        if stack is not None:
            n.meta["nn_module_stack"] = dict(stack)


def _replay(graph: fx.Graph, use: ExpertUse, factor: fx.Node, x: fx.Node, added: list) -> fx.Node:
    """`use`'s op on (x, factor passed through use's path), in x's dtype (the op's own kernels then apply)."""
    cur = graph.call_method("type_as", (factor, x))
    added.append(cur)
    prev = use.weight
    for step in use.path:
        src = cur
        cur = graph.node_copy(step, lambda n, prev=prev, src=src: src if n is prev else n)
        cur.meta = {}
        added.append(cur)
        prev = step
    args = list(use.node.args)
    args[use.weight_arg], args[use.x_arg] = cur, x
    out = graph.call_function(use.node.target, tuple(args), dict(use.node.kwargs))
    added.append(out)
    return out


def remove(graph: fx.Graph, folded_stack) -> None:
    """Take every expert update out of `graph` (fold): each `y + Δy` becomes y, the added nodes go, and the first
    reader of each stack on an expert path reads `folded_stack(key, old_weight_node)` (a node) instead."""
    for node in [n for n in graph.nodes if EXPERT_OUT in n.meta]:
        node.replace_all_uses_with(node.args[0])
    for node in reversed([n for n in graph.nodes if EXPERT_NODE in n.meta]):
        graph.erase_node(node)
    for node in [n for n in graph.nodes if EXPERT_HEAD in n.meta]:
        key, i = node.meta.pop(EXPERT_HEAD)
        args = list(node.args)
        args[i] = folded_stack(key, args[i])
        node.args = tuple(args)


def has_experts(graph: fx.Graph) -> bool:
    return any(EXPERT_NODE in n.meta for n in graph.nodes)
