"""Match: find every op that multiplies activations by a 2-D parameter, and select sites by pattern.

A *use* is one op node: (node, weight get_attr node, op kind, weight layout, activation argument).
A *site* is one weight: all its uses share one adapter (tied weights included).
Matching is done on the captured graph before any decomposition, where nn.Linear and F.linear are
`aten.linear`, GPT-2's Conv1D is `aten.addmm`, and `x @ W` is `aten.matmul` (DESIGN.md §6).
"""
from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import PatternError

aten = torch.ops.aten

# op -> (kind, index of the activation argument, index of the weight argument).
# The weight argument may be the parameter itself or a transpose of it.
_LINEAR_OPS = {
    aten.linear.default: ("linear", 0, 1),
    torch._C._nn.linear: ("linear", 0, 1),
    nn.functional.linear: ("linear", 0, 1),
}
_MATMUL_OPS = {
    aten.matmul.default: ("matmul", 0, 1),
    aten.mm.default: ("mm", 0, 1),
    aten.addmm.default: ("addmm", 1, 2),
    torch.matmul: ("matmul", 0, 1),
    operator.matmul: ("matmul", 0, 1),
    torch.mm: ("mm", 0, 1),
    torch.addmm: ("addmm", 1, 2),
}
_TRANSPOSE_FUNCS = {aten.t.default, aten.numpy_T.default, torch.t}


@dataclass
class Use:
    node: fx.Node  # the linear-like op
    weight_node: fx.Node  # get_attr of the parameter
    kind: str  # linear | matmul | mm | addmm
    layout: str  # "out_in": y = x Wᵀ (nn.Linear);  "in_out": y = x W (Conv1D, x @ W)
    x_index: int
    via_transpose: fx.Node | None  # the transpose node between weight and op, if any


@dataclass
class Site:
    """One adapted weight and the ops that use it."""

    name: str  # qualified name of the parameter in the model (first alias)
    target: str  # get_attr target of the weight in the captured graph
    shape: tuple[int, ...]
    d_in: int
    d_out: int
    layout: str
    uses: list[Use] = field(default_factory=list)
    aliases: tuple[str, ...] = ()

    @property
    def kinds(self) -> str:
        return ",".join(sorted({u.kind for u in self.uses}))


def _is_transpose_of_2d(node: fx.Node) -> fx.Node | None:
    """If `node` is a 2-D transpose of a get_attr node, return that get_attr node."""
    if node.op == "call_function":
        if node.target in _TRANSPOSE_FUNCS:
            src = node.args[0]
        elif node.target is aten.transpose.int and len(node.args) == 3:
            if {node.args[1], node.args[2]} not in ({0, 1}, {-1, -2}, {0, -1}, {1, -2}):
                return None
            src = node.args[0]
        elif node.target is aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
            src = node.args[0]
        elif node.target is getattr and node.args[1] in ("T", "mT"):
            src = node.args[0]
        else:
            return None
    elif node.op == "call_method" and node.target in ("t", "transpose", "permute"):
        if node.target == "transpose" and {*node.args[1:]} not in ({0, 1}, {-1, -2}, {0, -1}, {1, -2}):
            return None
        if node.target == "permute" and list(node.args[1:]) not in ([1, 0], [-1, -2]):
            return None
        src = node.args[0]
    else:
        return None
    return src if isinstance(src, fx.Node) and src.op == "get_attr" else None


def find_uses(graph: fx.Graph, resolve) -> tuple[list[Use], dict[str, list[fx.Node]]]:
    """Every linear-like use of a 2-D parameter in `graph`, and every other use of each get_attr target.

    `resolve(target)` returns the object a get_attr target refers to.
    """
    uses: list[Use] = []
    other: dict[str, list[fx.Node]] = {}
    linear_nodes: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        entry = _LINEAR_OPS.get(node.target)
        is_linear = entry is not None
        if entry is None:
            entry = _MATMUL_OPS.get(node.target)
        if entry is None:
            continue
        kind, xi, wi = entry
        if len(node.args) <= wi:
            continue
        w = node.args[wi]
        x = node.args[xi]
        if not isinstance(w, fx.Node) or not isinstance(x, fx.Node):
            continue
        via = None
        if w.op == "get_attr":
            weight = w
            layout = "out_in" if is_linear else "in_out"
        else:
            weight = _is_transpose_of_2d(w)
            if weight is None:
                continue
            via = w
            # linear(x, Wᵀ) computes x W: the stored parameter is (in, out).
            layout = "in_out" if is_linear else "out_in"
        obj = resolve(weight.target)
        if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or not obj.is_floating_point():
            continue
        if not isinstance(obj, nn.Parameter):
            continue  # a buffer or constant is not a trainable weight
        uses.append(Use(node, weight, kind, layout, xi, via))
        linear_nodes.add(node)
        if via is not None:
            linear_nodes.add(via)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        for user in node.users:
            if user not in linear_nodes:
                other.setdefault(node.target, []).append(user)
    return uses, other


def compile_pattern(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise PatternError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _candidates(name: str) -> tuple[str, ...]:
    if name.endswith(".weight"):
        return (name, name[: -len(".weight")])
    return (name,)


def matches(pattern: str, names) -> bool:
    test = compile_pattern(pattern)
    return any(test(c) for n in names for c in _candidates(n))


def _list(names, limit: int = 25) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def describe_use(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t) if node.op == "call_function" else f"{node.op} {t}"


def select(
    sites: list[Site],
    patterns,
    exclude,
    param_names: dict[str, nn.Parameter],
    other_uses: dict[str, list[str]],
) -> list[Site]:
    """Sites whose weight name matches a pattern and no exclude pattern.

    `param_names`: every qualified parameter name of the model (aliases included) → parameter.
    `other_uses`: parameter name → descriptions of its non-linear uses, for error messages.
    """
    if not patterns:
        raise PatternError(
            "no patterns given: pass glob patterns on weight names (e.g. ['*query', '*value']), "
            "regexes as 're:…', or '*' for every linear weight. Linear weights here: "
            + _list(s.name for s in sites)
        )
    site_names = [s.name for s in sites]
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        hit = [s for s in sites if matches(pattern, s.aliases or (s.name,))]
        if not hit:
            raise PatternError(_no_match_message(pattern, site_names, param_names, other_uses))
        for s in hit:
            chosen[s.name] = s
    for pattern in exclude:
        hit = [n for n in chosen if matches(pattern, chosen[n].aliases or (n,))]
        if not hit and not any(matches(pattern, s.aliases or (s.name,)) for s in sites):
            raise PatternError(
                f"exclude pattern {pattern!r} matches no linear weight; linear weights: {_list(site_names)}"
            )
        for n in hit:
            del chosen[n]
    if not chosen:
        raise PatternError(
            f"patterns {list(patterns)} minus exclude {list(exclude)} leave no site; linear weights: {_list(site_names)}"
        )
    return [s for s in sites if s.name in chosen]


def _no_match_message(pattern, site_names, param_names, other_uses) -> str:
    hit_params = [n for n in param_names if matches(pattern, (n,))]
    if hit_params:
        details = []
        for n in hit_params[:10]:
            p = param_names[n]
            if p.dim() != 2:
                details.append(f"{n} is {p.dim()}-D {tuple(p.shape)}, NEAT needs a 2-D linear weight")
            elif n in other_uses:
                details.append(f"{n} is used by {', '.join(sorted(set(other_uses[n])))}, not as a linear weight")
            else:
                details.append(f"{n} is not used as a linear weight in the captured graph")
        return (
            f"pattern {pattern!r} matches parameters that are not linear weights: {'; '.join(details)}. "
            f"Linear weights that patterns can select: {_list(site_names)}"
        )
    return (
        f"pattern {pattern!r} matches no linear weight. Patterns are fnmatch globs (or 're:' regexes) on "
        f"qualified weight names, with or without '.weight'. Candidates: {_list(site_names)}"
    )
