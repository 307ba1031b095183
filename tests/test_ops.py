"""The op table (neat_fx.ops), entry by entry, on hand-built graphs.

For every entry, every call target it lists (aten, torch, operator, Tensor method) and every slot, with the
weight read directly and through a transpose: structure (the matcher finds exactly that op node, that weight,
the expected layout and form) and numbers (the factorised adapter in that layout and form equals running the
op on W0 + ΔW, in float64). A table entry without a case here fails `test_every_entry_has_cases`."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import fx, nn

from neat_fx.adapters import neat_apply, neat_delta
from neat_fx.ops import EXPERT_OPS, OPS, Slot, expert_uses, flip, op_uses, replace_weight, transposed_source

aten = torch.ops.aten
D_IN, D_OUT, R = 5, 3, 2


def _activation_shape(kind: str, form: str) -> tuple[int, ...]:
    two_d = kind in ("mm", "addmm")
    if form == "right":
        return (4, D_IN) if two_d else (2, 4, D_IN)
    return (D_IN, 4) if two_d else (2, D_IN, 4)


def _bias_shape(form: str) -> tuple[int, ...]:
    return (D_OUT,) if form == "right" else (D_OUT, 1)


def _weight_shape(layout: str) -> tuple[int, int]:
    return (D_OUT, D_IN) if layout == "out_in" else (D_IN, D_OUT)


def _build(kind: str, target, is_method: bool, slot: Slot, transposed: bool, bias_at: int | None):
    """A GraphModule computing the op with W (a parameter) in `slot`, read directly or through `.t()`."""
    root = nn.Module()
    stored_layout = flip(slot.layout) if transposed else slot.layout
    g = torch.Generator().manual_seed(0)
    root.W = nn.Parameter(torch.randn(_weight_shape(stored_layout), generator=g, dtype=torch.float64))
    root.b = nn.Parameter(torch.randn(_bias_shape(slot.form), generator=g, dtype=torch.float64))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("W")
    if transposed:
        w = graph.call_method("t", (w,)) if is_method else graph.call_function(aten.t.default, (w,))
    n_args = max(slot.weight, slot.x, bias_at if bias_at is not None else -1) + 1
    args = [None] * n_args
    args[slot.weight], args[slot.x] = w, x
    if bias_at is not None:
        args[bias_at] = graph.get_attr("b")
    op = graph.call_method(target, tuple(args)) if is_method else graph.call_function(target, tuple(args))
    graph.output(op)
    return fx.GraphModule(root, graph), op


def _table_cases():
    for entry in OPS:
        if entry.einsum:
            continue
        targets = [(t, False) for t in entry.functions] + [(m, True) for m in entry.methods]
        for target, is_method in targets:
            for slot in entry.slots:
                for transposed in (False, True):
                    name = (
                        f"{entry.kind}-{getattr(target, '__name__', target)}-{'method' if is_method else 'fn'}-"
                        f"{slot.form}-{'t' if transposed else 'direct'}"
                    )
                    yield pytest.param(entry, target, is_method, slot, transposed, id=name)


def _is_param(gm):
    return lambda n: n.op == "get_attr" and isinstance(getattr(gm, n.target), nn.Parameter) and n.target == "W"


def _adapter_matches_op_on_merged_weight(gm, use, x_shape):
    """neat_apply in the use's layout and form == the op evaluated with W0 + ΔW (float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    A = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    B = torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    W = gm.W.detach().clone()
    y = gm(x)
    adapted = neat_apply(x, W, y, A, B, [], [], "relu", 0.7, use.layout, use.form)
    delta = neat_delta(W, A, B, [], [], "relu", 0.7, use.layout, dtype=torch.float64)
    with torch.no_grad():
        gm.W.add_(delta)
    want = gm(x)
    assert adapted.shape == want.shape
    adapted, want = adapted.detach(), want.detach()
    assert (adapted - want).abs().max() <= 1e-10 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("entry, target, is_method, slot, transposed", list(_table_cases()))
def test_table_entry(entry, target, is_method, slot, transposed):
    bias_at = entry.bias if entry.bias is not None and entry.bias not in (slot.weight, slot.x) else None
    gm, op = _build(entry.kind, target, is_method, slot, transposed, bias_at)
    uses = [u for n in gm.graph.nodes for u in op_uses(n, _is_param(gm))]
    assert len(uses) == 1, uses
    use = uses[0]
    assert use.node is op and use.weight.target == "W" and use.kind == entry.kind
    assert use.x.op == "placeholder"
    assert use.form == slot.form
    assert use.layout == (flip(slot.layout) if transposed else slot.layout)
    assert (use.via_transpose is not None) == transposed
    _adapter_matches_op_on_merged_weight(gm, use, _activation_shape(entry.kind, slot.form))


EINSUM_CASES = [
    # (equation, weight operand index, stored weight shape, x shape, expected layout)
    ("bsd,od->bso", 1, (D_OUT, D_IN), (2, 4, D_IN), "out_in"),
    ("...d,de->...e", 1, (D_IN, D_OUT), (2, 4, D_IN), "in_out"),
    ("od,bsd->bos", 0, (D_OUT, D_IN), (2, 4, D_IN), "out_in"),
    ("bd,od", 1, (D_OUT, D_IN), (4, D_IN), "out_in"),  # implicit output: "bo"
    ("bsd,od->b o", 1, (D_OUT, D_IN), (2, 4, D_IN), "out_in"),  # also sums over s; spaces allowed
    ("bds,do->bso", 1, (D_IN, D_OUT), (2, D_IN, 4), "in_out"),  # x contracts a middle dimension
]


def _einsum_graph(equation, wi, w_shape, varargs: bool, target):
    root = nn.Module()
    root.W = nn.Parameter(torch.randn(w_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w = graph.get_attr("W")
    operands = [x, w] if wi == 1 else [w, x]
    args = (equation, *operands) if varargs else (equation, operands)
    op = graph.call_function(target, args)
    graph.output(op)
    return fx.GraphModule(root, graph), op


@pytest.mark.parametrize(
    "target, varargs",
    [(aten.einsum.default, False), (torch.einsum, False), (torch.einsum, True)],
    ids=["aten", "torch-list", "torch-varargs"],
)
@pytest.mark.parametrize("equation, wi, w_shape, x_shape, layout", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_entry(target, varargs, equation, wi, w_shape, x_shape, layout):
    gm, op = _einsum_graph(equation, wi, w_shape, varargs, target)
    uses = [u for n in gm.graph.nodes for u in op_uses(n, _is_param(gm))]
    assert len(uses) == 1 and uses[0].node is op and uses[0].kind == "einsum"
    assert uses[0].layout == layout and uses[0].form.startswith("einsum:")
    _adapter_matches_op_on_merged_weight(gm, uses[0], x_shape)


@pytest.mark.parametrize(
    "equation, w_shape",
    [
        ("bd,bd->b", (4, D_IN)),  # the weight's indices both meet x: elementwise, not a projection
        ("bd,dd->bd", (D_IN, D_IN)),  # a repeated index (the diagonal)
        ("bd,oe->bdoe", (D_OUT, D_IN)),  # an outer product: nothing contracted
    ],
)
def test_einsum_that_is_not_a_projection_is_no_site(equation, w_shape):
    gm, _ = _einsum_graph(equation, 1, w_shape, False, aten.einsum.default)
    assert [u for n in gm.graph.nodes for u in op_uses(n, _is_param(gm))] == []


def test_weight_times_weight_is_no_site():
    root = nn.Module()
    root.W = nn.Parameter(torch.randn(3, 3))
    root.V = nn.Parameter(torch.randn(3, 3))
    graph = fx.Graph()
    graph.placeholder("x")
    mm = graph.call_function(aten.matmul.default, (graph.get_attr("W"), graph.get_attr("V")))
    graph.output(mm)
    fx.GraphModule(root, graph).graph.lint()
    params = lambda n: n.op == "get_attr"  # noqa: E731
    assert op_uses(mm, params) == []


@pytest.mark.parametrize(
    "make, counts",
    [
        (lambda g, w: g.call_function(aten.t.default, (w,)), True),
        (lambda g, w: g.call_function(aten.numpy_T.default, (w,)), True),
        (lambda g, w: g.call_function(aten.transpose.int, (w, 0, 1)), True),
        (lambda g, w: g.call_function(aten.transpose.int, (w, -1, -2)), True),
        (lambda g, w: g.call_function(aten.permute.default, (w, [1, 0])), True),
        (lambda g, w: g.call_function(torch.permute, (w, (-1, 0))), True),
        (lambda g, w: g.call_function(getattr, (w, "T")), True),
        (lambda g, w: g.call_function(getattr, (w, "mT")), True),
        (lambda g, w: g.call_method("t", (w,)), True),
        (lambda g, w: g.call_method("transpose", (w, 1, 0)), True),
        (lambda g, w: g.call_method("permute", (w, 1, 0)), True),
        (lambda g, w: g.call_method("permute", (w, [1, 0])), True),
        (lambda g, w: g.call_function(aten.transpose.int, (w, 0, 0)), False),
        (lambda g, w: g.call_function(aten.transpose.int, (w, 1, 2)), False),  # a 3-D transpose
        (lambda g, w: g.call_function(aten.permute.default, (w, [0, 1])), False),
        (lambda g, w: g.call_method("permute", (w, 0, 2, 1)), False),
        (lambda g, w: g.call_function(aten.neg.default, (w,)), False),
    ],
)
def test_transposes_that_count(make, counts):
    graph = fx.Graph()
    w = graph.placeholder("w")
    node = make(graph, w)
    assert (transposed_source(node) is w) == counts


def test_replace_weight_in_a_list_and_through_a_shared_transpose():
    """einsum keeps its operands in a list; a transpose another op also reads is copied, not rewired."""
    graph = fx.Graph()
    x, w, new = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("new")
    e = graph.call_function(aten.einsum.default, ("bd,od->bo", [x, w]))
    wt = graph.call_function(aten.t.default, (w,))
    mm = graph.call_function(aten.mm.default, (x, wt))
    other = graph.call_function(aten.neg.default, (wt,))
    graph.output((e, mm, other))
    assert replace_weight(graph, e, w, new) and e.args[1] == [x, new]
    assert replace_weight(graph, mm, w, new)
    assert mm.args[1] is not wt and mm.args[1].args[0] is new and other.args[0] is wt
    assert not replace_weight(graph, other, x, new)
    graph.lint()


def test_every_entry_has_cases():
    """Adding an op kind to the table needs its case here: einsum has EINSUM_CASES, the others are built from
    their slots by `_build` (which knows the activation shapes of each kind)."""
    kinds = {e.kind for e in OPS}
    covered = {p.values[0].kind for p in _table_cases()} | {"einsum"}
    assert kinds == covered
    assert all(k in ("linear", "matmul", "mm", "addmm", "einsum") for k in kinds), (
        "a new kind: teach _activation_shape its shapes"
    )


def test_operator_matmul_and_functional_linear_are_in_the_table():
    targets = {t for e in OPS for t in e.functions}
    assert operator.matmul in targets and torch.nn.functional.linear in targets and torch.einsum in targets


# -- routed experts (EXPERT_OPS) -------------------------------------------------------------------------------
E_EXPERTS, E_IN, E_OUT, E_R, E_N = 3, 8, 4, 4, 2  # sizes whose fp32 strides suit aten._grouped_mm's kernel


def _expert_cases():
    for entry in EXPERT_OPS:
        for name in sorted(entry.names):
            grouped = entry.kind == "grouped_mm"
            for path in [(), ("transpose",)] if grouped else [(), ("index",), ("transpose",), ("index", "transpose")]:
                yield pytest.param(entry, name, path, id=f"{name}-w{entry.weight}-{'-'.join(path) or 'direct'}")


def _expert_target(name):
    if name.startswith("transformers::"):
        pytest.importorskip("transformers.integrations.moe")  # registers the op
    ns, op = name.split("::")
    return getattr(getattr(torch.ops, ns), op).default


@pytest.mark.parametrize("entry, name, path", list(_expert_cases()))
def test_expert_entry(entry, name, path):
    """The matcher finds the per-expert op through the path with the expected layout, and the update experts.insert
    adds equals the op run on the stack W0 + ΔW (one NEAT per expert)."""
    from neat_fx.experts import ExpertsAdapter, insert

    target = _expert_target(name)
    grouped = entry.kind == "grouped_mm"
    dtype = torch.float32 if name == "aten::_grouped_mm" else torch.float64
    transposed = "transpose" in path
    stored = flip(entry.layout) if transposed else entry.layout
    g = torch.Generator().manual_seed(0)
    root = nn.Module()
    shape = (E_EXPERTS, E_OUT, E_IN) if stored == "out_in" else (E_EXPERTS, E_IN, E_OUT)
    root.W = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype), requires_grad=False)
    graph = fx.Graph()
    x = graph.placeholder("x")
    extra = graph.placeholder("extra")  # expert ids of every row (index) or group offsets (grouped_mm)
    w = graph.get_attr("W")
    if "index" in path:
        w = graph.call_function(aten.index.Tensor, (w, [extra]))
    if transposed:
        w = graph.call_function(aten.transpose.int, (w, -2, -1))
    args = [None] * 2
    args[entry.weight], args[entry.x] = w, x
    op = graph.call_function(target, (*args, extra) if grouped else tuple(args))
    graph.output(op)
    gm = fx.GraphModule(root, graph)

    uses = expert_uses(gm.graph, lambda n: n.op == "get_attr" and n.target == "W")
    assert len(uses) == 1
    use = uses[0]
    assert use.node is op and use.kind == entry.kind and use.layout == stored and len(use.path) == len(path)
    assert use.head is (use.path[0] if path else op)

    rows = 5 if "index" in path or grouped else E_EXPERTS
    if grouped:  # rows sorted by expert: 2, 0 and 3 rows
        x_val, extra_val = torch.randn(rows, E_IN, generator=g, dtype=dtype), torch.tensor([2, 2, 5], dtype=torch.int32)
    else:
        x_shape = (rows, E_IN, E_N) if entry.layout == "out_in" else (rows, E_N, E_IN)
        x_val = torch.randn(x_shape, generator=g, dtype=dtype)
        extra_val = torch.tensor([2, 0, 2, 1, 0]) if "index" in path else torch.zeros(0, dtype=torch.long)
    gm.adapters = nn.ModuleDict(
        {"w": ExpertsAdapter(E_EXPERTS, E_IN, E_OUT, E_R, 1, "relu", 0.7, stored, dtype=dtype, generator=g)}
    )
    with torch.no_grad():
        for p in gm.adapters["w"].parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    insert(gm.graph, uses, "w")
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        adapted = gm(x_val, extra_val)
        ad = gm.adapters["w"]
        delta = neat_delta(gm.W, *ad.tensors(), "relu", 0.7, stored, dtype=dtype)  # batched over experts
        assert delta.shape == shape
        gm.W.add_(delta)
        want = fx.GraphModule(root, _plain(gm.graph))(x_val, extra_val)
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    assert (adapted - want).abs().max() <= tol * max(1.0, float(want.abs().max()))


def _plain(graph):
    """A copy of `graph` without the expert update (the op reading the stack as it is)."""
    from neat_fx.experts import remove

    graph = copy.deepcopy(graph)
    remove(graph, lambda key, weight: weight)
    return graph


def test_expert_ops_need_an_activation_and_the_right_transpose():
    root = nn.Module()
    root.W, root.V = nn.Parameter(torch.randn(2, 3, 3)), nn.Parameter(torch.randn(2, 3, 3))
    graph = fx.Graph()
    x = graph.placeholder("x")
    w, v = graph.get_attr("W"), graph.get_attr("V")
    graph.output(
        (
            graph.call_function(aten.bmm.default, (w, v)),  # two stacks: no activation, no site
            graph.call_function(aten.bmm.default, (graph.call_function(aten.transpose.int, (w, 0, 1)), x)),
        )
    )
    assert expert_uses(graph, lambda n: n.op == "get_attr") == []
