"""Serving many NEAT adapters on one base: `neat_fx.serve(model, {"a": dir_a, "b": dir_b}, example_inputs)`.

At inference a trained NEAT site is a rank-r update: `H = σ(W0ᵀ A)` depends only on W0 and the adapter, so
`y + s·(x H) Bᵀ` is LoRA with `lora_A = Hᵀ`, `lora_B = B` (neat_fx.io.lora). The base is captured once; at
every adapted op the graph gets a `SiteBank` holding every adapter's `H` and `s·B` stacked (ranks padded with
zeros, an adapter without that site: zeros), indexed by one tensor, `active_index`. Parameters trained in
full (a classification head) are stacked the same way and read as `bank[active_index]`. So:

- switching the active adapter is one in-place write of `active_index` — no new graph, no recompilation
  under torch.compile, microseconds of host time;
- a **mixed batch** (`adapter_names=[...]`, one per row, like PEFT's) runs each adapter's rows as one
  sub-batch and puts the rows back in order: every row is computed exactly as its own adapter computes it.

Adapters of different ranks, depths, activations or site sets share one bank. Every adapter is checked
against the base (our format's fingerprints) before anything is built.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from . import capture as cap
from .adapters import neat_hidden
from .containers import FoldedModule
from .errors import AdapterMismatchError, ConfigError
from .io import fingerprint_matches, read_adapters
from .io.loaded import refuse_expert_sites
from .match import find_uses
from .names import adapter_key
from .transform import bind_targets

#: node.meta flag of the bank nodes serve() inserts.
BANK = "neat_bank"
#: inputs of the per-call graph a mixed batch runs: the adapter of the call, and each row's adapter (row-wise)
INDEX_INPUT, ROWS_INPUT = "neat_adapter_index", "neat_adapter_rows"
_BUILD_LOCK = threading.Lock()


class SiteBank(nn.Module):
    """Every adapter's `H` (N, d_in, r) and `s·B` (N, d_out, r) of one site, float32. Called as
    `bank(x, y, index, form)` → `y + (x H[index]) (s·B[index])ᵀ` in the op's form; with `rows` (a mixed batch's
    adapter per row, an argument of the call, never state) row b gets adapter rows[b]."""

    def __init__(self, h: torch.Tensor, sb: torch.Tensor):
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("sb", sb)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        form: str = "right",
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if rows is not None:
            return self._per_row(x, y, rows)
        h, sb = self.h.index_select(0, index)[0], self.sb.index_select(0, index)[0]
        x = x.to(h.dtype)
        if form == "right":
            return y + ((x @ h) @ sb.t()).to(y.dtype)
        if form == "left":
            return y + (sb @ (h.t() @ x)).to(y.dtype)
        eq_h, eq_b = form[len("einsum:") :].split(";")
        return y + torch.einsum(eq_b, torch.einsum(eq_h, x, h), sb).to(y.dtype)

    def _per_row(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Row b gets adapter rows[b]: `y[b] + (x[b] H[rows[b]]) (s·B[rows[b]])ᵀ` as two batched matmuls (the right
        form, x's first dimension the batch: checked by serve before it allows this path)."""
        h, sb = self.h.index_select(0, rows), self.sb.index_select(0, rows)  # (B, d_in, r), (B, d_out, r)
        xb = x.to(h.dtype).reshape(rows.shape[0], -1, x.shape[-1])
        d = torch.bmm(torch.bmm(xb, h), sb.transpose(1, 2))
        return y + d.reshape(y.shape).to(y.dtype)


class AdapterBank(FoldedModule):
    """What `serve` returns: the base model's graph with every adapter's update on each site. Called like the
    model (plus `adapter_names=` for a mixed batch); `set_adapter(name)` switches; `adapter_names` lists them."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.banks = nn.ModuleDict()
        self.trained = nn.Module()  # stacked parameters trained in full, one buffer per parameter
        # shape (1,), read with index_select: no data-dependent scalar, so no guard or graph break under compile
        self.register_buffer("active_index", torch.zeros(1, dtype=torch.long))
        # where each bank came from: bank key -> (parameter name, names of the adapters that have it); read by
        # the multi-adapter ONNX export (neat_fx.export) to name its inputs and write each adapter's file
        self.site_sources: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.trained_sources: dict[str, tuple[str, tuple[str, ...]]] = {}
        # whether every bank applies its update in the right form to an activation whose first dimension is
        # the batch (from the capture's symbolic shapes): then a mixed batch runs as one batch, each bank
        # picking every row's adapter, instead of one sub-batch per adapter
        self.rowwise = False

    @property
    def active(self) -> str:
        return self.names[int(self.active_index)]

    def index_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(
                f"no adapter named {name!r}; this bank serves {', '.join(map(repr, self.names))}"
            ) from None

    @torch.no_grad()
    def set_adapter(self, name: str):
        """Make `name` the adapter every call without `adapter_names` uses: one global switch, as in PEFT (an
        in-place write: no recompilation). A call with `adapter_names=` never reads it."""
        self.active_index.fill_(self.index_of(name))

    def forward(self, *args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return super().forward(*args, **kwargs)
        return self._mixed(args, kwargs, adapter_names)

    def _mixed(self, args, kwargs, adapter_names):
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ConfigError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        rows = [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not rows:
            raise ConfigError("a mixed batch needs tensor inputs whose first dimension is the batch")
        batch = rows[0].shape[0]
        if len(adapter_names) != batch:
            raise ConfigError(f"adapter_names has {len(adapter_names)} names for a batch of {batch} rows")
        index = torch.tensor([self.index_of(n) for n in adapter_names])
        pieces = []
        for rep, where, per_row in self._row_groups(index):
            whole = where.numel() == batch and bool((where == torch.arange(batch)).all())
            part = (
                leaves
                if whole
                else [
                    t.index_select(0, where.to(t.device))
                    if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch
                    else t
                    for t in leaves
                ]
            )
            a, k = pytree.tree_unflatten(part, spec)
            out = self._run_as(rep, per_row, a, k)
            if whole:
                return out
            pieces.append((where, out))
        return _scatter_rows(pieces, batch)

    def _run_as(self, adapter: int, rows: torch.Tensor | None, args: tuple, kwargs: dict):
        """The graph run with adapter number `adapter` (and, row-wise, each row's adapter `rows`) given to this
        call as arguments of the graph: nothing is written to the bank, so concurrent calls and `set_adapter`
        in other threads do not affect it."""
        self._sync_device()
        gm = self._per_call_graph()
        device = self.active_index.device
        extra = {INDEX_INPUT: torch.tensor([adapter], dtype=torch.long, device=device)}
        if self.rowwise:  # every row this adapter's unless a row map is given
            if rows is None:
                first = next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim())
                rows = torch.full((first.shape[0],), adapter, dtype=torch.long)
            extra[ROWS_INPUT] = rows.to(device)
        bound = self._bind("eval", args, kwargs)  # the errors of a plain call (InputMismatchError)
        bound.apply_defaults()  # this call's own object
        return self._run_checked(lambda: gm(**bound.arguments, **extra), bound, gm)

    def _per_call_graph(self) -> fx.GraphModule:
        """The eval graph with the adapter index (and the per-row map) as inputs instead of `active_index`,
        built once (under a lock: concurrent first calls build it once), again when the graph moves device."""
        cached = self.__dict__.get("_per_call_gm")  # (the device its graph was built for, the GraphModule)
        if cached is None or cached[0] != self._graph_device:
            with _BUILD_LOCK:
                cached = self.__dict__.get("_per_call_gm")
                if cached is None or cached[0] != self._graph_device:
                    cached = self.__dict__["_per_call_gm"] = (self._graph_device, _per_call_graph_module(self))
        return cached[1]

    def _row_groups(self, index: torch.Tensor):
        """(adapter whose trained-in-full parameters the group reads, its rows, each row's adapter or None).
        Row-wise banks: rows are grouped only by the parameters trained in full they read (a stacked parameter
        cannot differ between rows of one call) — adapters that trained none share one group, every bank picking
        each row's adapter. Otherwise one group per adapter, each run as its own sub-batch."""
        if not self.rowwise:
            return [(i, (index == i).nonzero().flatten(), None) for i in index.unique().tolist()]
        own = {
            i: tuple(i if self.names[i] in have else -1 for _, have in self.trained_sources.values())
            for i in index.unique().tolist()
        }
        groups: dict[tuple, list[int]] = {}
        for i, signature in own.items():
            groups.setdefault(signature, []).append(i)
        out = []
        for members in groups.values():
            where = torch.isin(index, torch.tensor(members)).nonzero().flatten()
            out.append((members[0], where, index[where]))
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.names}, active={self.active!r}, sites={len(self.banks)}"


def _per_call_graph_module(bank: AdapterBank) -> fx.GraphModule:
    """A copy of the bank's eval graph that takes INDEX_INPUT (the adapter of the call, shape (1,)) in place of
    `active_index` and, for a row-wise bank, ROWS_INPUT (each row's adapter) given to every site bank."""
    graph = copy.deepcopy(bank.graph("eval"))
    info = graph._codegen.pytree_info
    spec = info.in_spec
    if not (spec.type is tuple and spec.num_children == 2 and spec.child(1).type is dict):
        raise ConfigError(f"{type(bank).__name__}'s graph takes its inputs as {spec}, not (args, kwargs)")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        index = graph.placeholder(INDEX_INPUT)
    rows = None
    if bank.rowwise:
        with graph.inserting_after(index):
            rows = graph.placeholder(ROWS_INPUT)
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for node in [n for n in graph.nodes if n.op == "placeholder"]:  # first: the index is read before the inputs
        anchor.prepend(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target == "active_index":
            node.replace_all_uses_with(index)
            graph.erase_node(node)
        elif rows is not None and node.meta.get(BANK) and node.op == "call_module":
            node.kwargs = {**node.kwargs, "rows": rows}
    leaf = torch.empty(0)  # a stand-in leaf (None is no leaf to pytree)
    args, kwargs = pytree.tree_unflatten([leaf] * spec.num_leaves, spec)
    names = [INDEX_INPUT] + ([ROWS_INPUT] if rows is not None else [])
    kwargs = {**kwargs, **dict.fromkeys(names, leaf)}
    graph._codegen.pytree_info = info._replace(
        orig_args=[*info.orig_args, *names], in_spec=pytree.tree_structure((args, kwargs))
    )
    graph.lint()
    gm = fx.GraphModule(bank, graph)
    for name in list(gm._modules):  # the bank's own children, not GraphModule's copies of their paths
        if name in bank._modules:
            gm._modules[name] = bank._modules[name]
    return gm


def _scatter_rows(pieces: list, batch: int):
    """The outputs of sub-batches put back in row order (tensors whose first dimension is the sub-batch)."""
    flat = [pytree.tree_flatten(out) for _, out in pieces]
    spec = flat[0][1]
    merged = []
    for j, first in enumerate(flat[0][0]):
        if not isinstance(first, torch.Tensor) or first.dim() == 0:
            merged.append(first)  # a scalar (e.g. a loss): per-sub-batch values have no row to go to
            continue
        full = first.new_empty((batch, *first.shape[1:]))
        for (where, _), (leaves, _) in zip(pieces, flat):
            full.index_copy_(0, where.to(full.device), leaves[j])
        merged.append(full)
    return pytree.tree_unflatten(merged, spec)


def serve(model: nn.Module, adapters, example_inputs, *, active: str | None = None, dynamic=True) -> AdapterBank:
    """Serve several saved adapters (neat_fx or PEFT PEANuT folders) on one base model.

    adapters: {name: folder}, or a list of folders (named after the folders). The model is captured once in
    eval mode and shared (not copied, not modified). Returns an AdapterBank: call it like the model, switch
    with `bank.set_adapter(name)`, or pass `adapter_names=[...]` (one per row) for a mixed batch.
    """
    named = _named_folders(adapters)
    loaded = {name: read_adapters(folder) for name, folder in named.items()}
    for lo in loaded.values():
        refuse_expert_sites(lo, "neat_fx.serve")
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, tuple[str, ...]] = {}
    for n, p in params.items():
        aliases[id(p)] = (*aliases.get(id(p), ()), n)
    _check_against_base(loaded, params)

    args, kwargs = cap.split_example_inputs(example_inputs)
    cap.refuse_non_finite(args, kwargs)
    with cap.train_mode(model, False):
        cap.check_runs_eagerly(model, args, kwargs)
        captures = cap.capture(model, args, kwargs, method="export", modes=("eval",), dynamic=dynamic)
    bank = AdapterBank(list(named))
    bank.model = model
    graph = bind_targets(captures["eval"], model, bank)
    uses, _ = find_uses(graph, lambda t: cap.resolve_attr(bank, t))
    by_param: dict[int, list] = {}
    for u in uses:
        by_param.setdefault(id(cap.resolve_attr(bank, u.weight.target)), []).append(u)

    wanted = {n for lo in loaded.values() for n in lo.sites}
    site_param = {}
    for name in sorted(wanted):
        p = params[name]
        if id(p) not in by_param:
            raise AdapterMismatchError(
                f"{name} has adapters in {_who(loaded, name)} but is not used as a linear weight in "
                f"{type(model).__name__}'s captured graph"
            )
        site_param.setdefault(id(p), name)

    batch_dims = _batch_dims(graph)
    rowwise = bool(batch_dims)
    index = None
    for pid, name in site_param.items():
        key = adapter_key(name)
        site_uses = by_param[pid]
        bank.banks[key] = _site_bank(loaded, params[name], aliases[pid], site_uses[0].layout)
        bank.site_sources[key] = (
            name,
            tuple(a for a, lo in loaded.items() if any(n in lo.sites for n in aliases[pid])),
        )
        for u in site_uses:
            if index is None:
                first = next(n for n in graph.nodes if n.op != "placeholder")
                with graph.inserting_before(first):
                    index = graph.get_attr("active_index")
            rowwise = rowwise and u.form == "right" and _leading_dim(u.x) in batch_dims
            args = (u.x, u.node, index) + ((u.form,) if u.form != "right" else ())
            with graph.inserting_after(u.node):
                new = graph.call_module("banks." + key, args)
            new.meta[BANK] = key
            u.node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    _stack_trained(bank, graph, loaded, params, aliases, index)

    graph.lint()
    bank.rowwise = rowwise
    bank._set_graph("eval", graph)
    ref = next((n for n, p in model.named_parameters() if p.is_floating_point()), None)
    bank._set_reference("model." + ref if ref else None)
    bank.eval()
    if active is not None:
        bank.set_adapter(active)
    return bank


def _leading_dim(node) -> str | None:
    """The symbol of a node's first dimension in the capture's shapes (None: static or unknown)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or isinstance(val.shape[0], int):
        return None
    return str(val.shape[0])


def _batch_dims(graph: fx.Graph) -> set[str]:
    """The symbols of the inputs' first dimensions: the batch, when the capture kept it dynamic."""
    dims = {_leading_dim(n) for n in graph.nodes if n.op == "placeholder"}
    dims.discard(None)
    return dims


def _named_folders(adapters) -> dict[str, Path]:
    if isinstance(adapters, (str, Path)):
        adapters = [adapters]
    if not isinstance(adapters, (dict, list, tuple)):
        raise ConfigError(
            f"adapters must be {{name: folder}} or a list of folders, got {type(adapters).__name__}: e.g. "
            f"neat_fx.serve(model, {{'a': 'adapters/a', 'b': 'adapters/b'}}, example_inputs)"
        )
    if isinstance(adapters, dict):
        named = {str(k): Path(v) for k, v in adapters.items()}
    else:
        named = {}
        for folder in adapters:
            name = Path(folder).name
            if name in named:
                raise ConfigError(f"two adapter folders are both named {name!r}; pass a dict {{name: folder}}")
            named[name] = Path(folder)
    if not named:
        raise ConfigError("serve needs at least one adapter folder")
    for name in named:
        if not name:
            raise ConfigError("adapter names must be non-empty strings")
    return named


def _who(loaded: dict, site: str) -> str:
    return ", ".join(repr(n) for n, lo in loaded.items() if site in lo.sites)


def _check_against_base(loaded: dict, params: dict):
    """Every site and trained parameter exists in the model with the adapter's shapes, and our format's base
    fingerprints match (an adapter is only valid on the base it was trained on). Errors list every problem."""
    problems = []
    for adapter, lo in loaded.items():
        for name, t in lo.sites.items():
            p = params.get(name)
            if p is None:
                problems.append(f"{adapter!r}: site {name} is not a parameter of the model")
                continue
            meta = lo.site_meta.get(name) or {}
            layout = meta.get("layout", "out_in")
            d_out = p.shape[0] if layout == "out_in" else p.shape[1]
            if p.dim() != 2 or t["A"].shape[0] != d_out or t["B"].shape[0] != d_out:
                problems.append(
                    f"{adapter!r}: site {name} has A{tuple(t['A'].shape)} B{tuple(t['B'].shape)}, the model's "
                    f"weight is {tuple(p.shape)}"
                )
            elif meta.get("fingerprint") and not fingerprint_matches(meta["fingerprint"], p):
                problems.append(f"{adapter!r}: site {name} was trained on another base weight (fingerprint)")
        for name, t in lo.trainable.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(t.shape):
                where = "is not a parameter of the model" if p is None else f"has shape {tuple(p.shape)} in the model"
                problems.append(f"{adapter!r}: parameter {name} (trained in full, {tuple(t.shape)}) {where}")
    if problems:
        raise AdapterMismatchError(
            "these adapters do not fit this base model; nothing was built: " + "; ".join(problems[:10])
        )


@torch.no_grad()
def _site_bank(loaded: dict, weight: torch.Tensor, names: tuple[str, ...], layout: str) -> SiteBank:
    hs, sbs = [], []
    for lo in loaded.values():
        t = next((lo.sites[n] for n in names if n in lo.sites), None)
        if t is None:
            hs.append(None)
            sbs.append(None)
            continue
        c = lo.config
        h = neat_hidden(
            weight,
            t["A"].float(),
            [e.float() for e in t["encoders"]],
            [d.float() for d in t["decoders"]],
            c.activation,
            layout,
            torch.float32,
        )
        hs.append(h)
        sbs.append(c.scale * t["B"].float())
    rank = max(h.shape[1] for h in hs if h is not None)
    d_in = next(h.shape[0] for h in hs if h is not None)
    d_out = next(sb.shape[0] for sb in sbs if sb is not None)
    h_all = torch.zeros(len(hs), d_in, rank, device=weight.device)
    sb_all = torch.zeros(len(hs), d_out, rank, device=weight.device)
    for i, (h, sb) in enumerate(zip(hs, sbs)):
        if h is not None:  # ranks padded with zero columns, which add nothing
            h_all[i, :, : h.shape[1]] = h
            sb_all[i, :, : sb.shape[1]] = sb
    return SiteBank(h_all, sb_all)


def _stack_trained(bank: AdapterBank, graph: fx.Graph, loaded: dict, params: dict, aliases: dict, index):
    """Parameters trained in full by some adapter: one stacked buffer (the base value for adapters that did not
    train it), read by the graph as `stack[active_index]`."""
    trained = {n for lo in loaded.values() for n in lo.trainable}
    done: set[int] = set()
    for name in sorted(trained):
        p = params[name]
        if id(p) in done:
            continue
        done.add(id(p))
        names = aliases[id(p)]
        values, trained_by = [], []
        for adapter, lo in loaded.items():
            t = next((lo.trainable[n] for n in names if n in lo.trainable), None)
            values.append((t if t is not None else p).detach().to(device=p.device, dtype=p.dtype))
            if t is not None:
                trained_by.append(adapter)
        key = adapter_key(name)
        bank.trained_sources[key] = (name, tuple(trained_by))
        bank.trained.register_buffer(key, torch.stack(values))
        targets = {"model." + n for n in names}
        for node in list(graph.nodes):
            if node.op == "get_attr" and node.target in targets:
                if index is None:
                    first = next(n for n in graph.nodes if n.op != "placeholder")
                    with graph.inserting_before(first):
                        index = graph.get_attr("active_index")
                with graph.inserting_before(node):
                    stack = graph.get_attr("trained." + key)
                    picked = graph.call_function(torch.ops.aten.index_select.default, (stack, 0, index))
                    pick = graph.call_function(torch.ops.aten.select.int, (picked, 0, 0))
                node.replace_all_uses_with(pick)
                graph.erase_node(node)
