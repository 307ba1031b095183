"""The `torch.compile` backend "neat": NEAT-aware lowering before Inductor (or any other backend).

    torch.compile(nm, backend="neat")                                # a transformed model: train or serve
    torch.compile(model, backend=neat_fx.backend(adapters="dir/"))   # an untouched base model + saved adapters

Adapters must exist before compilation (a backend cannot create parameters an optimizer would see), so the
backend's work is lowering. Under torch.compile every NEAT site is one `neat_fx::adapter` node (see
`NeatAdapter.forward`); for each graph Dynamo hands over, the backend

- with gradients enabled (training), picks per site the cheaper form for the shapes at hand — factorised
  `y + s·(x H) Bᵀ`, or ΔW materialised and the base op rewritten to read `W + ΔW` — by a FLOP count of
  forward + backward (`training_flops`; `backend.plans` and the "neat_fx.backend" logger show the choice).
  Materialising makes the base op's weight need a gradient (tokens·d_in·d_out), so it only wins when the
  rank is large for the layer (r > d/6) and there are enough tokens to pay for ΔW; transformer q/v at
  r = 8 stay factorised;
- with gradients disabled (inference), folds: the base op reads `W0 + ΔW`, no adapter op is left. The folded
  weights enter the compiled graph as extra inputs computed before the call, recomputed only when an adapter
  or base tensor has changed since (its version counter moved), so training more never serves a stale fold
  and never forces a recompilation;
- with `adapters=DIR`, folds saved adapters into the base model's graphs (every graph, also around graph
  breaks) without touching the model's parameters; sites are found by parameter name, their base weights
  checked against the fingerprints saved with the adapters.

The lowered graph goes to `inner` ("inductor" by default; "aot_eager" and "eager" compile faster).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from .adapters import neat_apply, neat_delta, neat_fold
from .errors import AdapterMismatchError, ConfigError
from .io import fingerprint_matches, read_adapters
from .io.loaded import refuse_expert_sites
from .ops import Use, op_uses, replace_weight

log = logging.getLogger("neat_fx.backend")

ADAPTER_OP = torch.ops.neat_fx.adapter


@dataclass(frozen=True)
class SitePlan:
    """The lowering chosen for one NEAT site in one compiled graph."""

    site: str  # the weight's parameter name (as Dynamo names its source)
    form: str  # "folded", "factorised" or "materialised"
    tokens: int  # rows of x at compile time (a hint when the shape is dynamic)
    d_in: int
    d_out: int
    rank: int
    flops_factorised: int  # forward + backward, beyond the base op (training plans only)
    flops_materialised: int
    why: str = ""


def training_flops(tokens: int, d_in: int, d_out: int, rank: int, x_needs_grad: bool) -> tuple[int, int]:
    """Multiply-adds of one training step spent on one site beyond the base op, (factorised, materialised).

    Both forms compute H = σ(Wᵀ A) (d_in·d_out·r) and its backward into A (the same again).
    Factorised: x H and z Bᵀ forward, then ∂B, ∂z, ∂H (and ∂x when x needs it), each tokens·r·d.
    Materialised: ΔW = s·B Hᵀ (d_in·d_out·r), then the base op's weight now needs a gradient
    (tokens·d_in·d_out: the full-weight gradient PEANuT pays) and ∂B, ∂H from it (2·d_in·d_out·r);
    the base op's own forward and ∂x are unchanged.
    """
    h = 2 * d_in * d_out * rank
    fact = h + tokens * rank * (d_in + d_out) + tokens * rank * (2 * d_out + d_in + (d_in if x_needs_grad else 0))
    mat = h + 3 * d_in * d_out * rank + tokens * d_in * d_out
    return fact, mat


def _hint(v) -> int:
    if isinstance(v, torch.SymInt):
        return int(v.node.hint if v.node.hint is not None else v.node.shape_env.size_hint(v.node.expr))
    return int(v)


def _meta(node) -> torch.Tensor | None:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def parameter_name(node: fx.Node) -> str | None:
    """The dotted name of the module attribute a Dynamo placeholder reads (`bert.encoder…query.weight`),
    from its source (`L['self']._modules['bert']…_parameters['weight']`); None for other inputs."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None) if arg is not None else None
    if source is None:
        return None
    text = source.name if isinstance(source.name, str) else source.name()
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)", text)
    if not parts or "_parameters['" not in text and "_buffers['" not in text:
        return None
    return ".".join(a or b for a, b in parts)


def _weight_uses(weight: fx.Node) -> list[Use]:
    """The linear-like ops (by the op table) that multiply activations by `weight`, directly or through a
    transpose."""
    candidates = dict.fromkeys(n for user in weight.users for n in (user, *user.users))
    return [u for n in candidates for u in op_uses(n, lambda node: node is weight)]


def _materialised_weight(weight, A, B, encoders, decoders, activation, scale, layout):
    return weight + neat_delta(weight, A, B, encoders, decoders, activation, scale, layout, A.dtype).to(weight.dtype)


class NeatBackend:
    """A `torch.compile` backend; `neat_fx.backend(...)` makes one, `backend="neat"` uses the default one.

    adapters: a folder written by `save_adapters` (or a PEFT PEANuT checkpoint) to fold into the graphs of
    an untouched base model. inner: the backend the lowered graph goes to ("inductor", "aot_eager", "eager",
    or a callable). After a compilation, `plans` lists the lowering of every site of the latest graph, and
    `served_sites()` / `unserved_sites()` which saved sites were found so far.
    """

    def __init__(self, adapters=None, inner="inductor"):
        self.inner = inner
        self.plans: list[SitePlan] = []
        self.compiled_graphs = 0
        self._served: set[str] = set()
        self._folding = weakref.WeakSet()  # compiled graphs holding folded weights, for invalidate()
        self.adapters = None
        if adapters is not None:
            folder = Path(adapters)
            self.adapters = read_adapters(folder)  # FileNotFoundError / AdapterMismatchError name the problem
            refuse_expert_sites(self.adapters, "the compile backend (neat_fx.backend(adapters=…))")
            self.adapters_path = folder

    __name__ = "neat"

    def __repr__(self):
        src = f"adapters={str(self.adapters_path)!r}, " if self.adapters is not None else ""
        return f"neat_fx.backend({src}inner={self.inner!r})"

    # -- the backend protocol ------------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs):
        compiled = _Compiled(self, gm, list(example_inputs))
        if compiled.folds:
            self._folding.add(compiled)
        return compiled

    def invalidate(self):
        """Recompute every folded weight at the next call. Needed only after writing into weights in a way
        their version counters do not see (`param.data.copy_(…)`); optimizer steps, `load_adapters`,
        `merge_into` and `with torch.no_grad(): p.copy_(…)` are seen."""
        for compiled in list(self._folding):
            compiled.invalidate()

    def served_sites(self) -> list[str]:
        return sorted(self._served)

    def unserved_sites(self) -> list[str]:
        return [] if self.adapters is None else sorted(set(self.adapters.sites) - self._served)

    def _inner(self):
        if callable(self.inner):
            return self.inner
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.inner)


class _Compiled:
    """The callable handed back to Dynamo: the lowered graph compiled by `inner`, plus the folded weights it
    takes as extra inputs (recomputed when a tensor they depend on has changed)."""

    def __init__(self, backend: NeatBackend, gm: fx.GraphModule, example_inputs: list):
        self.backend = backend
        gm = _private_copy(gm)  # Dynamo keeps using the graph it handed over
        self.folds: list[tuple[callable, tuple]] = []  # (fn, arg spec) computing each extra input
        self.watched: list[int] = []  # indices of the inputs the folds read
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.index = {n: i for i, n in enumerate(placeholders)}
        grad = torch.is_grad_enabled()
        # A graph that switches gradients on inside (torch.enable_grad() in the compiled code) is not folded.
        toggles = any(n.op == "call_function" and n.target is torch._C._set_grad_enabled for n in graph.nodes)
        grad = grad or toggles
        plans = []
        for node in [
            n for n in graph.nodes if n.op == "call_function" and n.target in (ADAPTER_OP, ADAPTER_OP.default)
        ]:
            plans.append(self._lower_site(graph, node, example_inputs, grad))
        if backend.adapters is not None:
            plans += self._serve(graph, example_inputs)
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        self.n_inputs = len(placeholders)
        extra = self._extra_inputs(example_inputs)
        backend.plans = plans
        backend.compiled_graphs += 1
        for p in plans:
            log.info(
                "neat: %s → %s (tokens %d, %d×%d, r=%d%s)",
                p.site,
                p.form,
                p.tokens,
                p.d_out,
                p.d_in,
                p.rank,
                f"; {p.why}" if p.why else "",
            )
        _static_sizes(extra)
        self.compiled = backend._inner()(gm, example_inputs + extra)
        self.versions = self._versions(example_inputs)
        self.extra = extra

    # -- lowering one NEAT site ------------------------------------------------------------------------
    def _lower_site(self, graph: fx.Graph, node: fx.Node, example_inputs, grad: bool) -> SitePlan:
        x, weight, y, A, B, enc, dec, activation, scale, layout, *_form = node.args
        name = (parameter_name(weight) if weight.op == "placeholder" else None) or weight.name
        xm, am, wm = _meta(x), _meta(A), _meta(weight)
        d_out, rank = (_hint(am.shape[0]), _hint(am.shape[1])) if am is not None else (0, 0)
        d_in = _hint(wm.numel()) // max(d_out, 1) if wm is not None else 0
        tokens = _hint(xm.numel()) // max(d_in, 1) if xm is not None else 0  # rows of x, whichever its form
        tensors = [weight, A, B, *enc, *dec]
        producer = y if isinstance(y, fx.Node) and y.op in ("call_function", "call_method") else None
        if not grad:
            if all(t.op == "placeholder" for t in tensors) and producer is not None:
                new = self._add_input(graph, neat_fold, (weight, A, B, list(enc), list(dec), activation, scale, layout))
                if replace_weight(graph, producer, weight, new):
                    node.replace_all_uses_with(y)
                    graph.erase_node(node)
                    return SitePlan(name, "folded", tokens, d_in, d_out, rank, 0, 0)
                graph.erase_node(new)
                self.folds.pop()
            why = "cannot fold: the weight or adapter tensors are computed in the graph, or y's op was not found"
            node.target = neat_apply
            return SitePlan(name, "factorised", tokens, d_in, d_out, rank, 0, 0, why)
        x_grad = bool(getattr(xm, "requires_grad", True))
        fact, mat = training_flops(tokens, d_in, d_out, rank, x_grad)
        # Materialising rounds W + ΔW to the weight's dtype: only where that is exact enough (fp32/fp64).
        if (
            mat < fact
            and producer is not None
            and _meta(weight) is not None
            and _meta(weight).dtype in (torch.float32, torch.float64)
        ):
            with graph.inserting_before(producer):
                w_eff = graph.call_function(
                    _materialised_weight, (weight, A, B, list(enc), list(dec), activation, scale, layout)
                )
            if replace_weight(graph, producer, weight, w_eff):
                node.replace_all_uses_with(y)
                graph.erase_node(node)
                return SitePlan(name, "materialised", tokens, d_in, d_out, rank, fact, mat)
            graph.erase_node(w_eff)
        node.target = neat_apply  # AOTAutograd traces it into aten ops; Inductor fuses them with the rest
        return SitePlan(name, "factorised", tokens, d_in, d_out, rank, fact, mat)

    # -- serving saved adapters on a base model ----------------------------------------------------------
    def _serve(self, graph: fx.Graph, example_inputs) -> list[SitePlan]:
        loaded = self.backend.adapters
        cfg = loaded.config
        plans = []
        by_name = {}
        for ph in self.index:
            n = parameter_name(ph)
            if n is not None:
                by_name[n] = ph
        for site, t in loaded.sites.items():
            meta = loaded.site_meta.get(site)
            # Dynamo names a tied parameter by one of its aliases only: try them all.
            ph = next(
                (p for a in [site, *(meta or {}).get("aliases", [])] if (p := _lookup(by_name, a)) is not None), None
            )
            if ph is None:
                continue
            value = example_inputs[self.index[ph]]
            uses = _weight_uses(ph)
            if not uses:
                continue
            layout = meta["layout"] if meta else uses[0].layout
            d_out = value.shape[0] if layout == "out_in" else value.shape[1]
            if tuple(t["A"].shape) != (d_out, cfg.rank) or t["B"].shape[0] != d_out:
                raise AdapterMismatchError(
                    f"{self.backend.adapters_path}: site {site} has A{tuple(t['A'].shape)}, but the model's "
                    f"{site} is {tuple(value.shape)} ({layout}); these adapters were saved for another model"
                )
            if meta and not fingerprint_matches(meta["fingerprint"], value):
                raise AdapterMismatchError(
                    f"{self.backend.adapters_path}: the base weight {site} differs from the one the adapters were "
                    f"trained on (fingerprint mismatch); serve them on the base model they were trained on"
                )
            consts = [t["A"], t["B"], *t["encoders"], *t["decoders"]]
            spec = (
                "serve",
                self.index[ph],
                [c.to(value.device) for c in consts],
                cfg.hidden_layers,
                cfg.activation,
                cfg.scale,
                layout,
            )
            new = self._add_input(graph, _served_weight, spec)
            for use in uses:
                replace_weight(graph, use.node, ph, new)
            self.backend._served.add(site)
            rank = cfg.rank
            d_in = value.numel() // d_out
            plans.append(
                SitePlan(site, "folded", 0, d_in, d_out, rank, 0, 0, f"served from {self.backend.adapters_path}")
            )
        for name, tensor in loaded.trainable.items():
            ph = _lookup(by_name, name)
            if ph is None:
                continue
            value = example_inputs[self.index[ph]]
            if tuple(value.shape) != tuple(tensor.shape):
                raise AdapterMismatchError(
                    f"{self.backend.adapters_path}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model's {tuple(value.shape)}"
                )
            new = self._add_input(graph, _saved_tensor, ("saved", tensor, self.index[ph]))
            ph.replace_all_uses_with(new)
            self.backend._served.add(name)
            plans.append(SitePlan(name, "replaced", 0, 0, 0, 0, 0, 0, "trained in full; saved value"))
        if (
            loaded.sites
            and not any(p.form == "folded" for p in plans)
            and any(_weight_uses(ph) for ph in by_name.values())
        ):
            log.warning(
                "neat: a compiled graph multiplies by %d parameters, none of them a saved site of %s (saved: %s …)",
                sum(bool(_weight_uses(p)) for p in by_name.values()),
                self.backend.adapters_path,
                ", ".join(list(loaded.sites)[:3]),
            )
        return plans

    # -- extra inputs --------------------------------------------------------------------------------
    def _add_input(self, graph: fx.Graph, fn, spec) -> fx.Node:
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            node = graph.placeholder(f"neat_folded_{len(self.folds)}")
        node._dynamo_source = None  # AOTAutograd asks every Dynamo placeholder for its source; ours has none
        self.folds.append((fn, spec))
        return node

    def _resolve(self, spec, args):
        def get(a):
            if isinstance(a, fx.Node):
                return args[self.index[a]]
            if isinstance(a, list):
                return [get(v) for v in a]
            return a

        return [get(a) for a in spec]

    def _extra_inputs(self, args) -> list[torch.Tensor]:
        out = []
        watched = set()
        for fn, spec in self.folds:
            if fn is neat_fold:
                watched.update(self.index[n] for n in (*spec[:3], *spec[3], *spec[4]))
                out.append(fn(*self._resolve(spec, args)))
            else:
                if fn is _served_weight:
                    watched.add(spec[1])
                out.append(fn(spec, args))
        self.watched = sorted(watched)
        return out

    def _versions(self, args):
        out = []
        for i in self.watched:
            t = args[i]
            try:
                out.append((id(t), t._version))
            except RuntimeError:  # an inference tensor has no version counter: refold on every call
                out.append((id(t), object()))
        return out

    def invalidate(self):
        self.versions = None

    def __call__(self, *args):
        if self.folds:
            now = self._versions(args)
            if now != self.versions:  # a weight or adapter changed (optimizer step, load): refold
                self.extra = self._extra_inputs(list(args))
                self.versions = self._versions(args)
            return self.compiled(*args, *self.extra)
        return self.compiled(*args)


def _static_sizes(extra: list[torch.Tensor]) -> None:
    """Tell AOTAutograd (through this compilation's tracing context) that the extra inputs have static sizes.

    AOTAutograd fakifies an input Dynamo did not see with fresh dynamic sizes that no Dynamo source backs;
    a guard on one of them (broadcasting's `infer_size`, a matmul's size check) can then reach Dynamo's
    guard creation and fail there (`IndexError` in `produce_guards_verbose`). Whether it does depended on
    symbol names, hence on the cache state: cold caches failed. A folded weight never changes shape, so
    its sizes are constants; the entry lives in the tracing context of this one compilation only."""
    from torch._dynamo.source import ConstantSource
    from torch._guards import TracingContext
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatefulSymbolicContext

    context = TracingContext.try_get()
    if context is None:  # called outside torch.compile: nothing fakifies the inputs with Dynamo's shape env
        return
    for i, t in enumerate(extra):
        context.tensor_to_context[t] = StatefulSymbolicContext(
            dynamic_sizes=[DimDynamic.STATIC] * t.dim(),
            constraint_sizes=[None] * t.dim(),
            tensor_source=ConstantSource(f"neat_folded_{i}"),
        )


def _private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a Dynamo GraphModule whose graph can be rewritten, with what AOTAutograd reads of Dynamo's
    (the compile id in `meta`, parameter sources, each placeholder's `_dynamo_source`)."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        out._param_name_to_source = gm._param_name_to_source
    return out


def _lookup(by_name: dict, name: str):
    if name in by_name:
        return by_name[name]
    hits = [v for k, v in by_name.items() if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _served_weight(spec, args):
    _, index, consts, hidden_layers, activation, scale, layout = spec
    weight = args[index]
    A, B, layers = consts[0], consts[1], consts[2:]
    return neat_fold(weight, A, B, layers[:hidden_layers], layers[hidden_layers:], activation, scale, layout)


def _saved_tensor(spec, args):
    _, tensor, index = spec
    ref = args[index]
    return tensor.to(device=ref.device, dtype=ref.dtype)


def backend(adapters=None, inner="inductor") -> NeatBackend:
    """A "neat" backend for `torch.compile(..., backend=neat_fx.backend(...))`.

    adapters: a saved adapter folder to fold into an untouched base model at compile time.
    inner: where the lowered graph goes ("inductor", "aot_eager", "eager" or a backend callable).
    """
    if not (callable(inner) or isinstance(inner, str)):
        raise ConfigError(f"inner must be a backend name or callable, got {type(inner).__name__}")
    return NeatBackend(adapters=adapters, inner=inner)


# The instance behind torch.compile(..., backend="neat") (entry point group "torch_dynamo_backends").
neat = NeatBackend()
