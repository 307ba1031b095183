"""FX passes run on a copy of the folded eval graph before ONNX export (docs/design.md, "The export passes").

Each rewrite is a function on an fx.Graph (returning how many places it changed) wrapped in a `PassBase`
subclass; `export_pass_manager` runs the chosen ones through torch.fx's `PassManager`, ordered by the
constraints below, and the export report lists the passes whose `PassResult` says they changed the graph.
"""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from neat_fx.capture import resolve_attr
from neat_fx.ops import lookup, right_activation


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`scaled_dot_product_attention` written as MatMul/Softmax/MatMul, with the same results.

    The exporter's own lowering masks with -inf and then replaces the resulting NaNs elementwise on every
    (batch, heads, L, S) score tensor; here masked scores get the dtype's lowest finite value (no NaN can
    appear) and rows without any allowed key are zeroed on the (batch, heads, L, d) output instead, which is
    what sdpa returns for them. On a 2-core CPU that is ≈ 10 % of BERT's ONNX Runtime latency.
    """
    L, S = q.size(-2), k.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if enable_gqa and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    valid = None
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # An additive mask on the mask's own (usually head-free) shape, then one Add on the scores.
            lowest = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
            zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
            scores = scores + torch.where(attn_mask, zero, lowest)
            valid = attn_mask.any(dim=-1, keepdim=True)
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = torch.matmul(probs, v)
    if valid is not None:
        # A Mul by the (batch, 1, L, 1) 0/1 row mask: out is finite (no -inf in the scores), so this equals the
        # Where, and ONNX Runtime broadcasts a Mul faster.
        out = out * valid.to(out.dtype)
    return out


_SDPA = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)


def sdpa_to_eager_attention(graph: fx.Graph) -> int:
    """Replace every scaled_dot_product_attention call by `eager_attention`. Returns the count."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            node.target = eager_attention
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# Unread positions: a classifier that reads one position of the last hidden state (BERT's [CLS], a decoder's last
# token) makes the whole last block run on every position, although only one row of its output is read. The pass
# below works backwards from each `select` and narrows every op that acts on positions independently (linear,
# layer norm, elementwise, views that keep the leading dims, the query side of attention) to the selected row.
# Nothing an output reads changes: any node with a user that needs all rows stays whole.

_aten = torch.ops.aten
_POINTWISE = {
    _aten.gelu.default,
    _aten.relu.default,
    _aten.tanh.default,
    _aten.sigmoid.default,
    _aten.silu.default,
    _aten.add.Tensor,
    _aten.sub.Tensor,
    _aten.mul.Tensor,
    _aten.div.Tensor,
    _aten.clone.default,
    _aten.contiguous.default,
    _aten.alias.default,
    _aten.neg.default,
    _aten.pow.Tensor_Scalar,
    _aten.rsqrt.default,
    _aten.sqrt.default,
    _aten.exp.default,
    _aten.erf.default,
}
_VIEWS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}
_BIG = 2**62
_WORK = {
    _aten.linear.default,
    _aten.matmul.default,
    _aten.mm.default,
    _aten.scaled_dot_product_attention.default,
}  # worth narrowing


def _shape(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def _norm(dim, rank):
    return dim + rank if isinstance(dim, int) and dim < 0 else dim


def _is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _sdpa_options(node: fx.Node) -> dict:
    """scaled_dot_product_attention's arguments after q, k, v by name, however they were passed."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return dict(zip(names, node.args[3:]), **node.kwargs)


def _uses(node: fx.Node, inp: fx.Node) -> int:
    """How many argument slots of `node` hold `inp`."""
    n = 0

    def count(a):
        nonlocal n
        n += a is inp
        return a

    fx.node.map_arg((node.args, node.kwargs), count)
    return n


def _input_demands(node: fx.Node, demand):
    """{input: (dim, index)} that `node` places on its inputs when its own output is narrowed to `demand`
    (None: the whole output is needed), and {arg position: value} of size arguments to rewrite; None where
    the op cannot be narrowed. An input narrowed in one slot must not also fill a slot that needs it whole
    (`sdpa(h, h, h)`: the keys and values need every row)."""
    got = _raw_input_demands(node, demand)
    if got is None or demand is None:
        return got
    pointwise = node.target in _POINTWISE or node.target is _aten.dropout.default
    if node.kwargs and not pointwise and node.target is not _aten.scaled_dot_product_attention.default:
        return None  # sizes or bounds given by keyword: not read here, so not narrowed
    if not pointwise and any(_uses(node, a) != 1 for a in got[0]):
        return None
    return got


def _raw_input_demands(node: fx.Node, demand):
    t, args = node.target, node.args
    out = _shape(node)
    if demand is None:
        if t is _aten.select.int and isinstance(args[2], int) and _shape(args[0]):
            return {args[0]: (_norm(args[1], len(_shape(args[0]))), args[2])}, {}
        return {}, {}
    dim, index = demand
    if out is None:
        return None
    x = args[0]
    xs = _shape(x)
    if t in _POINTWISE or (t is _aten.dropout.default and len(args) > 2 and args[2] is False):
        placed = {}
        for a in node.all_input_nodes:
            s = _shape(a)
            if s is None:
                return None
            d = dim - (len(out) - len(s))
            if d >= 0 and not _is_one(s[d]):
                placed[a] = (d, index)
        return placed, {}
    if xs is None:
        return None
    xi = right_activation(node, lambda a: len(_shape(a) or ()) or None)
    if xi is not None and t is not _aten.addmm.default:  # (addmm's activation is 2-D: no leading dims to narrow)
        if args[xi] is not x:
            return None
        return ({x: (dim, index)}, {}) if dim < len(xs) - 1 else None
    if t is _aten.layer_norm.default:
        return ({x: (dim, index)}, {}) if dim < len(xs) - len(args[1]) else None
    if t in _VIEWS:
        if dim < len(xs) and all(_same(xs[j], out[j]) for j in range(dim + 1)):
            shape = list(args[1])
            if not (isinstance(shape[dim], int) and shape[dim] == -1):
                shape[dim] = 1
            return {x: (dim, index)}, {1: shape}
        return None
    if t is _aten.transpose.int:
        a, b = _norm(args[1], len(xs)), _norm(args[2], len(xs))
        return {x: ({a: b, b: a}.get(dim, dim), index)}, {}
    if t is _aten.permute.default:
        return {x: (_norm(args[1][dim], len(xs)), index)}, {}
    if t is _aten.expand.default:
        sizes = list(args[1])
        d = dim - (len(sizes) - len(xs))
        placed = {x: (d, index)} if d >= 0 and not _is_one(xs[d]) else {}
        if sizes[dim] != -1:
            sizes[dim] = 1
        return placed, {1: sizes}
    if t is _aten.slice.Tensor:
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        whole = start in (None, 0) and step == 1 and (end is None or (isinstance(end, int) and end >= _BIG))
        return ({x: (dim, index)}, {}) if whole else None
    if t is _aten.scaled_dot_product_attention.default:
        kw = _sdpa_options(node)
        if dim != len(out) - 2 or kw.get("is_causal") or kw.get("dropout_p", 0.0):
            return None
        placed = {x: (len(xs) - 2, index)}
        mask = kw.get("attn_mask")
        if isinstance(mask, fx.Node):
            ms = _shape(mask)
            if ms is None or len(ms) < 2:
                return None
            if not _is_one(ms[-2]):
                placed[mask] = (len(ms) - 2, index)
        return placed, {}
    return None


def prune_unread_positions(graph: fx.Graph) -> int:
    """Narrow every op whose output rows are only read through one `select` to that row (see above).
    Returns the number of ops narrowed; 0 leaves the graph untouched."""
    demand, placed, rewrites = {}, {}, {}
    for node in reversed(list(graph.nodes)):
        wants = [placed.get(u, {}).get(node) for u in node.users]
        mine = wants[0] if node.op == "call_function" and wants and all(w == wants[0] for w in wants) else None
        got = _input_demands(node, mine) if node.op == "call_function" else ({}, {})
        if got is None:  # an op this pass does not know: it needs its inputs whole, so it stays whole too
            mine, got = None, _input_demands(node, None)
        demand[node], (placed[node], rewrites[node]) = mine, got
    narrowed = [n for n, d in demand.items() if d is not None]
    if not any(n.target in _WORK for n in narrowed):
        return 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if demand[node] is None:  # a select reading a narrowed input: the row is now row 0
            if node.target is _aten.select.int and node.args[0] in placed[node] and demand[node.args[0]] is not None:
                node.args = (node.args[0], node.args[1], 0)
            continue
        for pos, value in rewrites[node].items():
            node.args = node.args[:pos] + (value,) + node.args[pos + 1 :]
        for inp, (d, i) in placed[node].items():
            if demand[inp] is None:  # shared with users that need every row: narrow a view of it for this one
                with graph.inserting_before(node):
                    cut = graph.call_function(_aten.slice.Tensor, (inp, d, i, i + 1 if i != -1 else _BIG))
                # every slot of `inp` in `node` is a narrowed one (checked in _input_demands)
                node.replace_input_with(inp, cut)
        node.meta.pop("val", None)  # its shape changed: no later pass may trust the old one
    graph.lint()
    return len(narrowed)


_SCALE_COMMUTING = {
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.transpose.int,
    _aten.permute.default,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.contiguous.default,
    _aten.clone.default,
}


def _scaled_operands(node: fx.Node) -> list[int] | None:
    """Argument positions of the constant weight (and bias) of a linear-like op whose output is x·W (+ b), so
    that scaling them scales the output; None if the op is not one or they are not constants (get_attr)."""
    entry = lookup(node)
    if entry is None or entry.einsum:
        return None
    slot = next((s for s in entry.slots if s.form == "right" and len(node.args) > max(s.weight, s.x)), None)
    if slot is None:
        return None
    positions = [slot.weight]
    if entry.bias is not None and len(node.args) > entry.bias and node.args[entry.bias] is not None:
        positions.append(entry.bias)
    if not all(isinstance(node.args[i], fx.Node) and node.args[i].op == "get_attr" for i in positions):
        return None
    if entry.kind == "addmm" and len(node.args) > 3:
        return None  # beta / alpha given: the bias is not simply added
    return positions


def fold_attention_scale(graph: fx.Graph, root: torch.nn.Module) -> int:
    """Move attention's 1/√d from the scores into the query projection: sdpa(q, …, scale=s) with
    q = views of linear(x, W, b) becomes sdpa(q', …, scale=1) with q' from linear(x, s·W, s·b), s·W and s·b
    new constants registered on a new child of `root` (the originals are untouched: other graphs may use
    them). The scores' MatMul then needs no scale (ONNX Runtime's FusedMatMul with alpha looked costlier in
    MiniLM's CPU profile; an end-to-end A/B showed no effect beyond noise). Equal up to float rounding. Only
    where W and b are constants (get_attr) and the views between the projection and the attention have no
    other reader.
    Returns the number of attention calls changed."""
    n, holder, holder_name, replaced = 0, None, None, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.scaled_dot_product_attention.default:
            continue
        q = node.args[0]
        kw = _sdpa_options(node)
        if _uses(node, q) != 1:  # q is also the keys or values (sdpa(h, h, h)): scaling it would scale those
            continue
        src = q
        while (
            isinstance(src, fx.Node)
            and src.op == "call_function"
            and src.target in _SCALE_COMMUTING
            and len(src.users) == 1
        ):
            src = src.args[0]
        qs = _shape(q)
        if not (isinstance(src, fx.Node) and len(src.users) == 1 and not src.kwargs) or not qs:
            continue
        positions = _scaled_operands(src)  # the projection's weight and bias, by the op table
        if positions is None:
            continue
        scale = kw.get("scale")
        if scale is None:
            if not isinstance(qs[-1], int):
                continue
            scale = 1.0 / math.sqrt(qs[-1])
        if not isinstance(scale, float):
            continue
        if holder is None:  # a child of our own: never one the caller's model brought under that name
            holder_name = "export_constants"
            while holder_name in root._modules:
                holder_name += "_"
            holder = torch.nn.Module()
            root.add_module(holder_name, holder)
        args = list(src.args)
        for i in positions:
            a = args[i]
            name = f"scaled_{len(holder._buffers)}"
            value = resolve_attr(root, a.target).detach() * scale
            holder.register_buffer(name, value)
            with graph.inserting_before(src):
                args[i] = graph.get_attr(f"{holder_name}.{name}")
            args[i].meta.update(a.meta)  # the same shape and dtype: later passes read them
            replaced.append(a)
        src.args = tuple(args)
        if len(node.args) > 6:  # scale given by position
            node.args = node.args[:6] + (1.0,) + node.args[7:]
        else:
            node.kwargs = {**node.kwargs, "scale": 1.0}
        n += 1
    if n:
        for node in dict.fromkeys(replaced):
            if not node.users:
                graph.erase_node(node)
        graph.lint()
    return n


# ---------------------------------------------------------------------------------------------------------------
# The passes, as torch.fx passes.


def approximate_gelu(graph: fx.Graph) -> int:
    """GELU with the tanh approximation (faster in ONNX Runtime; the drift is reported by verification)."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _aten.gelu.default:
            node.kwargs = {**node.kwargs, "approximate": "tanh"}
            n += 1
    return n


class ExportPass(PassBase):
    """A rewrite of the export copy of the eval graph. After a run, `count` is how many places it changed and
    `result` its PassResult; `describe()` says what it did, for the export report."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.result: PassResult | None = None

    def rewrite(self, gm: fx.GraphModule) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.count = self.rewrite(graph_module)
        self.result = PassResult(graph_module, self.count > 0)
        return self.result


class FoldAttentionScale(ExportPass):
    def rewrite(self, gm):
        return fold_attention_scale(gm.graph, gm)

    def describe(self):
        return f"attention scale folded into the query projection ×{self.count}"


class PruneUnreadPositions(ExportPass):
    def rewrite(self, gm):
        return prune_unread_positions(gm.graph)

    def describe(self):
        return f"positions no output reads left uncomputed ({self.count} ops narrowed to the selected row)"


class EagerAttention(ExportPass):
    def rewrite(self, gm):
        return sdpa_to_eager_attention(gm.graph)

    def describe(self):
        return f"attention as MatMul/Softmax ×{self.count} (no per-score NaN guard)"


class ApproximateGelu(ExportPass):
    def rewrite(self, gm):
        return approximate_gelu(gm.graph)

    def describe(self):
        return f"GELU tanh approximation ×{self.count}"


def _before(this: type, that: type):
    """A PassManager constraint: a pass of class `this` runs before any of class `that`."""

    def depends_on(a, b) -> bool:
        return not (isinstance(a, that) and isinstance(b, this))

    return depends_on


CONSTRAINTS = [
    # The scale pass reads the query's head size from shapes that pruning invalidates, and finds attention as
    # sdpa nodes, which the eager rewrite replaces; pruning narrows sdpa nodes too.
    _before(FoldAttentionScale, PruneUnreadPositions),
    _before(FoldAttentionScale, EagerAttention),
    _before(PruneUnreadPositions, EagerAttention),
]


def export_pass_manager(rewrite_attention: bool, approximate: bool) -> PassManager:
    """The passes an export asks for, ordered by CONSTRAINTS (whatever order they are listed in)."""
    chosen: list[ExportPass] = []
    if approximate:
        chosen.append(ApproximateGelu())
    if rewrite_attention:
        chosen += [EagerAttention(), PruneUnreadPositions(), FoldAttentionScale()]
    pm = PassManager(passes=chosen, constraints=CONSTRAINTS, steps=1, run_checks_after_each_pass=True)
    pm.solve_constraints()
    return pm


def applied(pm: PassManager) -> list[str]:
    """What the passes that changed the graph did, in the order they ran."""
    return [p.describe() for p in pm.passes if p.result is not None and p.result.modified]
