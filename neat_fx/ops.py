"""The one table of linear-like ops: which ops multiply an activation by a 2-D weight, which argument is
which, the weight's layout, the transposes that count, and how the adapter meets the activation.

Used by matching (`transform`), `fold`, the compile backend and the export passes (docs/design.md, "The op
table"). Adding an op kind is one `LinearOp` entry here plus one case in tests/test_ops.py.

Layout — how the op reads the stored parameter:
    "out_in"  W is (d_out, d_in): nn.Linear's x·Wᵀ, a weight on the left (W @ x)
    "in_out"  W is (d_in, d_out): GPT-2's Conv1D and x @ W
A transpose between the parameter and the op flips it.

Form — which dimension of the activation meets the weight, i.e. how the adapter applies H and B:
    "right"   x's last dimension contracts: y = x·M, adapter y + s·(x H) Bᵀ
    "left"    x's dimension -2 contracts:   y = M·x, adapter y + s·B (Hᵀ x)
    "einsum:EQ_H;EQ_B"  an einsum: adapter y + s·einsum(EQ_B, einsum(EQ_H, x, H), B)

Routed experts (`EXPERT_OPS`, at the end): a 3-D parameter (E, ·, ·) holding one matrix per expert, read by a
per-expert matmul — `bmm` / `matmul` after indexing by expert ids (transformers' "batched_mm"), `_grouped_mm`
or transformers' `grouped_mm_fallback` with offsets ("grouped_mm") — directly or through a transpose of its last
two dimensions. The layout is then that of one expert's matrix, as the op reads it.
"""

from __future__ import annotations

import operator
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

LAYOUTS = ("out_in", "in_out")


@dataclass(frozen=True)
class Slot:
    """Where an op holds its weight and its activation (argument indices), and what that position means."""

    weight: int
    x: int
    form: str  # "right" or "left"
    layout: str  # the layout of a weight read directly in this slot


@dataclass(frozen=True)
class LinearOp:
    """One kind of linear-like op, as it appears in captured (aten), traced (torch) and Dynamo graphs."""

    kind: str
    functions: frozenset  # call_function targets
    methods: frozenset = frozenset()  # call_method names (Tensor methods; args[0] is self)
    slots: tuple[Slot, ...] = ()
    bias: int | None = None  # argument index of an added bias, if the op has one
    einsum: bool = False  # slots come from the equation (see _einsum_use)


_RIGHT_MATMUL = Slot(weight=1, x=0, form="right", layout="in_out")
_LEFT_MATMUL = Slot(weight=0, x=1, form="left", layout="out_in")

OPS: tuple[LinearOp, ...] = (
    LinearOp(
        "linear",
        frozenset({aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear}),
        slots=(Slot(weight=1, x=0, form="right", layout="out_in"),),
        bias=2,
    ),
    LinearOp(
        "matmul",
        frozenset({aten.matmul.default, torch.matmul, operator.matmul}),
        frozenset({"matmul", "__matmul__"}),
        slots=(_RIGHT_MATMUL, _LEFT_MATMUL),
    ),
    LinearOp("mm", frozenset({aten.mm.default, torch.mm}), frozenset({"mm"}), slots=(_RIGHT_MATMUL, _LEFT_MATMUL)),
    LinearOp(
        "addmm",
        frozenset({aten.addmm.default, torch.addmm}),
        frozenset({"addmm"}),
        slots=(Slot(weight=2, x=1, form="right", layout="in_out"), Slot(weight=1, x=2, form="left", layout="out_in")),
        bias=0,
    ),
    LinearOp("einsum", frozenset({aten.einsum.default, torch.einsum}), einsum=True),
)

_BY_FUNCTION = {f: op for op in OPS for f in op.functions}
_BY_METHOD = {m: op for op in OPS for m in op.methods}

# Transposes of a 2-D tensor: ops without dimension arguments, and those whose dimensions must swap 0 and 1.
_TRANSPOSE_PLAIN = frozenset({aten.t.default, aten.numpy_T.default, torch.t})
_TRANSPOSE_DIMS = frozenset({aten.transpose.int, torch.transpose})
_PERMUTE = frozenset({aten.permute.default, torch.permute})


def lookup(node: fx.Node) -> LinearOp | None:
    """The table entry of `node`'s op, or None."""
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def _swaps_2d(dims) -> bool:
    """Whether a permutation of a 2-D tensor's dimensions swaps them ((1, 0), (-1, -2), …)."""
    dims = list(dims)
    return len(dims) == 2 and all(isinstance(d, int) and -2 <= d <= 1 for d in dims) and [d % 2 for d in dims] == [1, 0]


def transposed_source(node) -> fx.Node | None:
    """If `node` transposes a 2-D tensor (t, .T, .mT, transpose(0, 1), permute(1, 0), …), that tensor's node."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, rest = node.args[0], node.args[1:]
    if node.op == "call_function":
        t = node.target
        if t in _TRANSPOSE_PLAIN:
            return src
        if t in _TRANSPOSE_DIMS and len(rest) == 2 and _is_pair_swap(*rest):
            return src
        if t in _PERMUTE and len(rest) == 1 and _swaps_2d(rest[0]):
            return src
        if t is getattr and rest and rest[0] in ("T", "mT"):
            return src
        return None
    if node.op == "call_method":
        if node.target == "t" and not rest:
            return src
        if node.target == "transpose" and len(rest) == 2 and _is_pair_swap(*rest):
            return src
        if node.target == "permute" and (
            _swaps_2d(rest) or (len(rest) == 1 and isinstance(rest[0], (list, tuple)) and _swaps_2d(rest[0]))
        ):
            return src
    return None


def _is_pair_swap(a, b) -> bool:
    return isinstance(a, int) and isinstance(b, int) and -2 <= a <= 1 and -2 <= b <= 1 and a % 2 != b % 2


def flip(layout: str) -> str:
    return "in_out" if layout == "out_in" else "out_in"


@dataclass
class Use:
    """One op that multiplies an activation by a weight."""

    node: fx.Node  # the linear-like op
    weight: fx.Node  # the weight's own node (get_attr in captured graphs, placeholder in Dynamo's)
    x_arg: tuple[int, ...]  # where the op holds its activation: (i,) = args[i], (i, j) = args[i][j]
    kind: str  # the table entry's kind: linear | matmul | mm | addmm | einsum
    layout: str  # "out_in" or "in_out" (see the module docstring)
    form: str  # "right", "left" or "einsum:EQ_H;EQ_B"
    via_transpose: fx.Node | None = None  # the transpose node between weight and op, if any

    @property
    def x(self) -> fx.Node:
        """The activation, read now: rewriting an earlier op (inserting its adapter) changes it."""
        return _get_arg(self.node, self.x_arg)


def _get_arg(node: fx.Node, path: tuple[int, ...]):
    value = node.args[path[0]]
    return value[path[1]] if len(path) > 1 else value


def _weight_behind(arg, is_weight: Callable[[fx.Node], bool]) -> tuple[fx.Node | None, fx.Node | None]:
    """(weight node, transpose node or None) if `arg` is a weight or a 2-D transpose of one."""
    if not isinstance(arg, fx.Node):
        return None, None
    if is_weight(arg):
        return arg, None
    src = transposed_source(arg)
    if src is not None and is_weight(src):
        return src, arg
    return None, None


def op_uses(node: fx.Node, is_weight: Callable[[fx.Node], bool]) -> list[Use]:
    """The weight uses of one op node. `is_weight(n)` says whether a node is a weight (for a get_attr: a 2-D
    floating-point parameter). An op multiplying two weights has no activation and yields none."""
    entry = lookup(node)
    if entry is None:
        return []
    if entry.einsum:
        return _einsum_use(node, entry, is_weight)
    found = []
    for slot in entry.slots:
        if len(node.args) <= max(slot.weight, slot.x):
            continue
        weight, via = _weight_behind(node.args[slot.weight], is_weight)
        x = node.args[slot.x]
        if weight is None or not isinstance(x, fx.Node) or _weight_behind(x, is_weight)[0] is not None:
            continue
        layout = slot.layout if via is None else flip(slot.layout)
        found.append(Use(node, weight, (slot.x,), entry.kind, layout, slot.form, via))
    return found


def linear_uses(graph: fx.Graph, is_weight: Callable[[fx.Node], bool]) -> list[Use]:
    """Every use of a weight by a linear-like op in `graph`, in graph order."""
    return [u for node in graph.nodes for u in op_uses(node, is_weight)]


# -- einsum --------------------------------------------------------------------------------------------------
def einsum_operands(node: fx.Node) -> tuple[str | None, list, list[tuple[int, ...]]]:
    """(equation, operands, argument path of each operand): aten and `torch.einsum(eq, [a, b])` hold the
    operands in a list (args[1]), `torch.einsum(eq, a, b)` as separate arguments."""
    if not node.args or not isinstance(node.args[0], str):
        return None, [], []
    if len(node.args) >= 2 and isinstance(node.args[1], (list, tuple)):
        return node.args[0], list(node.args[1]), [(1, j) for j in range(len(node.args[1]))]
    return node.args[0], list(node.args[1:]), [(i,) for i in range(1, len(node.args))]


def _einsum_parts(equation: str) -> tuple[list[str], str] | None:
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:  # implicit output: the ellipsis, then the indices seen once, alphabetically (torch's rule)
        lhs = eq
        letters = [c for c in lhs if c.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return lhs.split(","), out


def _einsum_use(node: fx.Node, entry: LinearOp, is_weight) -> list[Use]:
    equation, operands, paths = einsum_operands(node)
    if equation is None or len(operands) != 2:
        return []
    parts = _einsum_parts(equation)
    if parts is None or len(parts[0]) != 2:
        return []
    inputs, out = parts
    found = []
    for wi in (0, 1):
        weight, via = _weight_behind(operands[wi], is_weight)
        x = operands[1 - wi]
        if weight is None or not isinstance(x, fx.Node) or _weight_behind(x, is_weight)[0] is not None:
            continue
        sw, sx = inputs[wi], inputs[1 - wi]
        if via is not None:
            sw = sw[::-1]  # subscripts of Wᵀ read backwards are W's
        if len(sw) != 2 or not sw.isalpha() or sw[0] == sw[1]:
            continue
        contracted = [c for c in sw if c in sx and c not in out]
        free = [c for c in sw if c not in sx and c in out]
        if len(contracted) != 1 or len(free) != 1 or sx.count(contracted[0]) != 1 or out.count(free[0]) != 1:
            continue
        c, f = contracted[0], free[0]
        r = next(ch for ch in string.ascii_letters if ch not in equation)
        out_r = out.replace(f, r)
        form = f"einsum:{sx},{c}{r}->{out_r};{out_r},{f}{r}->{out}"
        found.append(Use(node, weight, paths[1 - wi], entry.kind, "out_in" if sw == f + c else "in_out", form, via))
    return found


# -- rewriting ------------------------------------------------------------------------------------------------
def _arg_paths(node: fx.Node):
    for i, a in enumerate(node.args):
        if isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                yield (i, j), b
        else:
            yield (i,), a


def _set_arg(node: fx.Node, path: tuple[int, ...], value):
    args = list(node.args)
    if len(path) == 1:
        args[path[0]] = value
    else:
        inner = list(args[path[0]])
        inner[path[1]] = value
        args[path[0]] = type(node.args[path[0]])(inner)
    node.args = tuple(args)


def replace_weight(graph: fx.Graph, op: fx.Node, weight: fx.Node, new_weight: fx.Node) -> bool:
    """Make the linear-like `op` read `new_weight` where it reads `weight`, directly or through a 2-D transpose
    (copied, so other readers of that transpose keep the old weight). False if `op` reads `weight` in neither
    way."""
    for path, a in _arg_paths(op):
        if a is weight:
            _set_arg(op, path, new_weight)
            return True
        if isinstance(a, fx.Node) and transposed_source(a) is weight:
            with graph.inserting_before(op):
                copy = graph.node_copy(a, lambda n: new_weight if n is weight else n)
            _set_arg(op, path, copy)
            if not a.users:
                graph.erase_node(a)
            return True
    return False


def right_activation(node: fx.Node, weight_dims: Callable[[fx.Node], int | None]) -> int | None:
    """The argument index of the activation if `node` is a table op contracting its activation's last
    dimension with a 2-D operand (`weight_dims(arg)` gives an argument's rank), else None. Such an op treats
    the activation's leading positions independently (what the export pass pruning positions needs)."""
    entry = lookup(node)
    if entry is None or entry.einsum:
        return None
    for slot in entry.slots:
        if (
            slot.form == "right"
            and len(node.args) > max(slot.weight, slot.x)
            and weight_dims(node.args[slot.weight]) == 2
        ):
            return slot.x
    return None


# -- routed experts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertOp:
    """A per-expert matmul: `weight` is an (E, ·, ·) stack (or its rows picked by expert ids), `x` the activations
    meeting it; `layout` is how one expert's matrix is read in that slot. Bilinear in (x, weight) per expert, so
    the op applied to (x, H) and then to (x H, Bᵀ) gives the adapter's update (neat_fx.experts)."""

    kind: str
    names: frozenset  # qualified op names (`OpOverload.name()` without the overload), e.g. "aten::bmm"
    weight: int
    x: int
    layout: str


EXPERT_OPS: tuple[ExpertOp, ...] = (
    ExpertOp("bmm", frozenset({"aten::bmm"}), weight=0, x=1, layout="out_in"),  # W[ids] @ x: batched_mm
    ExpertOp("bmm", frozenset({"aten::bmm"}), weight=1, x=0, layout="in_out"),  # x @ W[ids]: transposed storage
    ExpertOp("matmul", frozenset({"aten::matmul"}), weight=0, x=1, layout="out_in"),
    ExpertOp("matmul", frozenset({"aten::matmul"}), weight=1, x=0, layout="in_out"),
    # grouped_mm(x (S, d_in), W (E, d_in, d_out), offs): rows of x sorted by expert, offs their cumulative counts
    ExpertOp(
        "grouped_mm",
        frozenset({"aten::_grouped_mm", "transformers::grouped_mm_fallback"}),
        weight=1,
        x=0,
        layout="in_out",
    ),
)


def op_name(node: fx.Node) -> str | None:
    """`aten::bmm` for a call_function of an OpOverload (or OpOverloadPacket), else None."""
    if node.op != "call_function":
        return None
    name = getattr(node.target, "name", None)
    if callable(name):  # OpOverload.name() → "aten::bmm" (overload dropped)
        try:
            return name().split(".")[0]
        except Exception:  # noqa: BLE001 - any other callable with a name() method
            return None
    qual = getattr(node.target, "_qualified_op_name", None)  # OpOverloadPacket
    return qual if isinstance(qual, str) else None


@dataclass
class ExpertUse:
    """One per-expert matmul reading a 3-D expert stack: `path` the nodes from the stack to the op (each reads the
    previous one in args[0]: an index by expert ids or a swap of the last two dimensions), the op, and where it
    holds the stack's descendant and the activation."""

    node: fx.Node  # the per-expert matmul
    weight: fx.Node  # the stack's get_attr
    path: tuple[fx.Node, ...]  # index / transpose nodes between weight and op, in order (may be empty)
    weight_arg: int  # where the op holds path[-1] (or the weight itself)
    x_arg: int
    kind: str  # ExpertOp.kind
    layout: str  # one expert's matrix as stored: "out_in" (E, d_out, d_in) or "in_out" (E, d_in, d_out)

    @property
    def head(self) -> fx.Node:
        """The first node reading the stack (path[0], or the op)."""
        return self.path[0] if self.path else self.node


def _expert_step(node: fx.Node) -> str | None:
    """How `node`, reading a 3-D expert stack (or its rows) in args[0], passes it on: "index" (rows picked by one
    tensor of expert ids), "transpose" (last two dimensions swapped), else None."""
    name = op_name(node)
    args = node.args
    if name == "aten::index" and len(args) == 2 and isinstance(args[1], (list, tuple)) and len(args[1]) == 1:
        return "index" if isinstance(args[1][0], fx.Node) else None
    if name == "aten::transpose" and len(args) == 3 and all(isinstance(d, int) for d in args[1:]):
        return "transpose" if {args[1] % 3, args[2] % 3} == {1, 2} else None
    if name == "aten::permute" and len(args) == 2 and [d % 3 for d in args[1]] == [0, 2, 1]:
        return "transpose"
    return None


def expert_uses(graph: fx.Graph, is_stack: Callable[[fx.Node], bool]) -> list[ExpertUse]:
    """Every per-expert matmul (EXPERT_OPS) reading a 3-D stack `is_stack(node)` accepts, directly or through
    index-by-expert-ids and last-two-dimension transposes, in graph order. An op multiplying two stacks is none."""
    by_name: dict[str, list[ExpertOp]] = {}
    for e in EXPERT_OPS:
        for n in e.names:
            by_name.setdefault(n, []).append(e)
    found = []
    for weight in graph.nodes:
        if not is_stack(weight):
            continue
        frontier = [(weight, (), False)]
        while frontier:
            node, path, flipped = frontier.pop()
            for user in node.users:
                step = _expert_step(user) if user.args and user.args[0] is node else None
                if step is not None:
                    frontier.append((user, (*path, user), flipped ^ (step == "transpose")))
                    continue
                for entry in by_name.get(op_name(user) or "", ()):
                    if len(user.args) <= max(entry.weight, entry.x) or user.args[entry.weight] is not node:
                        continue
                    x = user.args[entry.x]
                    if not isinstance(x, fx.Node) or _reads_stack(x, is_stack):
                        continue
                    layout = flip(entry.layout) if flipped else entry.layout
                    found.append(ExpertUse(user, weight, path, entry.weight, entry.x, entry.kind, layout))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(found, key=lambda u: order[u.node])


def _reads_stack(node: fx.Node, is_stack) -> bool:
    while True:
        if is_stack(node):
            return True
        if _expert_step(node) is None or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
