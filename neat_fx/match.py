"""Match: find every op that multiplies activations by a 2-D parameter (or a 3-D stack of routed experts), and
select sites by pattern.

A *use* is one op node (neat_fx.ops.Use): which op, which weight, the activation, layout and form.
A *site* is one weight: all its uses share one adapter (tied weights included). A 3-D stack of routed experts
read by a per-expert matmul (neat_fx.ops.EXPERT_OPS) is one site of E experts (neat_fx.experts).
Matching is done on the captured graph before any decomposition, where nn.Linear and F.linear are
`aten.linear`, GPT-2's Conv1D is `aten.addmm`, `x @ W` is `aten.matmul` and `torch.einsum` is
`aten.einsum` (docs/design.md, "Capture" and "The op table").
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import fx, nn

from . import quantized
from .errors import PatternError
from .names import pattern_candidates
from .ops import ExpertUse, Use, expert_uses, linear_uses


@dataclass
class Site:
    """One adapted weight and the ops that use it."""

    name: str  # qualified name of the parameter in the model (first alias)
    target: str  # get_attr target of the weight in the captured graph
    shape: tuple[int, ...]
    d_in: int
    d_out: int
    layout: str
    uses: list[Use | ExpertUse] = field(default_factory=list)
    aliases: tuple[str, ...] = ()
    experts: int = 0  # E for a stack of routed experts (shape (E, ·, ·); d_in, d_out are one expert's)

    @property
    def kinds(self) -> str:
        kinds = ",".join(sorted({u.kind for u in self.uses}))
        return f"{kinds} ({self.experts} experts)" if self.experts else kinds


def parameter_predicate(resolve):
    """`is_weight` for captured graphs: a get_attr of a 2-D floating-point nn.Parameter (a buffer or a constant
    is not a trainable weight), or the `dequantize` node through which the graph reads a quantized 2-D parameter
    (neat_fx.quantized). `resolve(target)` returns the object a get_attr target refers to."""

    def is_weight(node: fx.Node) -> bool:
        if quantized.is_dequantize(node):
            source = node.args[0]
            if source.op != "get_attr":
                return False
            obj = resolve(source.target)
            return isinstance(obj, nn.Parameter) and len(quantized.logical_shape(obj)) == 2
        if node.op != "get_attr":
            return False
        obj = resolve(node.target)
        return (
            isinstance(obj, nn.Parameter)
            and obj.dim() == 2
            and obj.is_floating_point()
            and quantized.format_of(obj) is None
        )

    return is_weight


def stack_predicate(resolve):
    """`is_stack` for captured graphs: a get_attr of a 3-D floating-point nn.Parameter (routed experts)."""

    def is_stack(node: fx.Node) -> bool:
        if node.op != "get_attr":
            return False
        obj = resolve(node.target)
        return isinstance(obj, nn.Parameter) and obj.dim() == 3 and obj.is_floating_point()

    return is_stack


def find_uses(graph: fx.Graph, resolve, experts: bool = False) -> tuple[list, dict[str, list[fx.Node]]]:
    """Every linear-like use of a 2-D parameter in `graph` (by the op table, neat_fx.ops) — and, with `experts`,
    every per-expert matmul reading a 3-D expert stack (`ExpertUse`s) — and every other use of each get_attr
    target."""
    uses = linear_uses(graph, parameter_predicate(resolve))
    linear_nodes = {u.node for u in uses} | {u.via_transpose for u in uses if u.via_transpose is not None}
    if experts:
        stack_uses = expert_uses(graph, stack_predicate(resolve))
        uses = uses + stack_uses
        linear_nodes |= {u.head for u in stack_uses}
    other: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":  # a module left whole (capture="fx") reads its own parameters
            for name, _ in resolve(node.target).named_parameters():
                other.setdefault(f"{node.target}.{name}", []).append(node)
        if node.op != "get_attr":
            continue
        for user in node.users:
            # a quantized weight is read through its dequantize node: what reads that node uses the weight
            for reader in user.users if quantized.is_dequantize(user) else (user,):
                if reader not in linear_nodes:
                    other.setdefault(node.target, []).append(reader)
    return uses, other


def compile_pattern(pattern: str):
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise PatternError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
        return lambda name: rx.fullmatch(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def matches(pattern: str, names) -> bool:
    test = compile_pattern(pattern)
    return any(test(c) for n in names for c in pattern_candidates(n))


def name_list(names, limit: int = 25) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def describe_use(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t) if node.op == "call_function" else f"{node.op} {t}"


#: the pattern preset with PEFT's meaning of `target_modules="all-linear"` (any case).
ALL_LINEAR = "all-linear"

#: names of sequence-classification heads, which "all-linear" leaves out when a model has no output embeddings
#: (PEFT's SEQ_CLS_HEAD_NAMES).
CLASSIFIER_HEADS = ("score", "classifier")


def output_head_names(model: nn.Module) -> set[str]:
    """The parameter names of the model's output head, which "all-linear" leaves out: the weights of the module
    `get_output_embeddings()` returns (a language-model head), else of a top-level `score` / `classifier` module
    of a model that has that method (a Hugging Face classifier). Empty for other models."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return set()
    head = getter()
    if not isinstance(head, nn.Module):
        head = next((m for n in CLASSIFIER_HEADS if isinstance(m := getattr(model, n, None), nn.Module)), None)
    if head is None:
        return set()
    owned = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in owned}


def select(
    sites: list[Site],
    patterns,
    exclude,
    param_names: dict[str, nn.Parameter],
    other_uses: dict[str, list[str]],
    output_heads: set[str] = frozenset(),
) -> list[Site]:
    """Sites whose weight name matches a pattern and no exclude pattern.

    `param_names`: every qualified parameter name of the model (aliases included) → parameter.
    `other_uses`: parameter name → descriptions of its non-linear uses, for error messages.
    `output_heads`: the names "all-linear" leaves out (output_head_names).
    """
    if not patterns:
        raise PatternError(
            "no patterns given: pass glob patterns on weight names (e.g. ['*query', '*value']), "
            "regexes as 're:…', or '*' for every linear weight. Linear weights here: " + name_list(_described(sites))
        )
    chosen: dict[str, Site] = {}
    for pattern in patterns:
        if pattern.lower() == ALL_LINEAR:  # PEFT's meaning: 2-D linear weights; expert stacks only when named
            hit = [s for s in sites if not s.experts and not output_heads.intersection(s.aliases or (s.name,))]
        else:
            hit = [s for s in sites if matches(pattern, s.aliases or (s.name,))]
        if not hit:
            raise PatternError(_no_match_message(pattern, sites, param_names, other_uses))
        for s in hit:
            chosen[s.name] = s
    for pattern in exclude:
        hit = [n for n in chosen if matches(pattern, chosen[n].aliases or (n,))]
        if not hit and not any(matches(pattern, s.aliases or (s.name,)) for s in sites):
            raise PatternError(
                f"exclude pattern {pattern!r} matches no linear weight; linear weights: {name_list(_described(sites))}"
            )
        for n in hit:
            del chosen[n]
    if not chosen:
        raise PatternError(
            f"patterns {list(patterns)} minus exclude {list(exclude)} leave no site; "
            f"linear weights: {name_list(_described(sites))}"
        )
    return [s for s in sites if s.name in chosen]


def _no_match_message(pattern, sites, param_names, other_uses) -> str:
    hit_params = [n for n in param_names if matches(pattern, (n,))]
    if hit_params:
        details = []
        for n in hit_params[:10]:
            p = param_names[n]
            if p.dim() == 3:
                read = (
                    f"read by {', '.join(sorted(set(other_uses[n])))}"
                    if n in other_uses
                    else "not read in the captured graph"
                )
                details.append(
                    f"{n} is 3-D {tuple(p.shape)} but {read}; a stack of routed experts is adapted where a per-expert "
                    f"matmul reads it (bmm/matmul after indexing by expert ids, or grouped_mm: a Hugging Face MoE "
                    f"with experts_implementation='batched_mm' or 'grouped_mm')"
                )
            elif p.dim() != 2:
                details.append(
                    f"{n} is {p.dim()}-D {tuple(p.shape)}, NEAT needs a 2-D linear weight or a 3-D experts stack"
                )
            elif quantized.unknown_subclass(p):
                details.append(quantized.unknown_format_message(n, p))
            elif n in other_uses:
                details.append(f"{n} is used by {', '.join(sorted(set(other_uses[n])))}, not as a linear weight")
            else:
                details.append(f"{n} is not used as a linear weight in the captured graph")
        return (
            f"pattern {pattern!r} matches parameters that are not linear weights: {'; '.join(details)}. "
            f"Linear weights that patterns can select: {name_list(_described(sites))}"
        )
    hint = ""
    if "expert" in pattern.lower() and not any(s.experts for s in sites):
        hint = " This model has no routed-experts stacks (3-D expert weights read per expert) in its captured graph."
    return (
        f"pattern {pattern!r} matches no linear weight. Patterns are fnmatch globs (or 're:' regexes) on "
        f"qualified weight names, with or without '.weight'.{hint} Candidates: {name_list(_described(sites))}"
    )


def _described(sites):
    """Site names for error messages, an experts stack marked as such."""
    return [f"{s.name} ({s.experts} experts)" if s.experts else s.name for s in sites]
