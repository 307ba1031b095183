"""The containers: nn.Modules that run one captured graph per mode ("train" / "eval").

`GraphContainer` is the mechanism; `NeatModule` (what `transform` returns: the graphs with adapters) and
`FoldedModule` (what `fold` returns: the graphs without them) are its two kinds.

The graphs are `fx.GraphModule`s kept outside the module tree; their top-level attributes are the
container's own submodules (the user's model, the adapters, …), so parameters are shared, not copied,
and `state_dict` / `parameters()` list each tensor once. `.train()` / `.eval()` pick the graph.

Captured graphs hard-code the device of the example inputs (`arange(device=cpu)`, metadata asserts),
so before each call the container checks where its weights live and rewrites those constants if the
module has moved. A dtype change after capture is refused: the graph's casts were traced for the old
dtype (an explicit float32 upcast cannot be told from an incidental one).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import units as _units
from .config import NeatConfig
from .errors import ConfigError, InputMismatchError
from .units import short_names


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    ia = a.index if a.index is not None else 0
    ib = b.index if b.index is not None else 0
    return ia == ib


def retarget_devices(graph: fx.Graph, old: torch.device, new: torch.device) -> int:
    """Replace every torch.device constant equal to `old` in the graph's node arguments by `new`."""
    changed = 0

    def swap(v):
        nonlocal changed
        if isinstance(v, torch.device) and _same_device(v, old):
            changed += 1
            return new
        return v

    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
    return changed


_GUARD_EQUAL = re.compile(r"Guard failed: (\w+)\.size\(\)\[(\d+)\] == (\w+)\.size\(\)\[(\d+)\]\s*$")
_GUARD = re.compile(r"Guard failed: (\w+)\.size\(\)\[(\d+)\] (==|<=|>=|<|>) (\d+)\s*$")


def _example_size(gm: fx.GraphModule, name: str, dim: int) -> int | None:
    """The size input `name` had along `dim` in the example inputs of the capture (from its placeholder)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == name:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and dim < val.dim():
                size = val.shape[dim]
                if isinstance(size, torch.SymInt):
                    hint = size.node.hint
                    return int(hint) if hint is not None else None
                return int(size)
    return None


def _explain_guard(message: str, arguments: dict, gm: fx.GraphModule, container) -> str:
    """A guard failure of the captured graph, said in the user's terms: which input, which dimension, the range
    the capture allows and why (a limit of the model, or a specialisation of the capture and its fix)."""
    guard = message.split("Guard failed:", 1)[1].strip()
    m = _GUARD.search(message)
    pair = _GUARD_EQUAL.search(message)
    if pair is not None:
        (a, da), (b, db) = (pair.group(1), int(pair.group(2))), (pair.group(3), int(pair.group(4)))
        size = {
            n: arguments[n].shape[d]
            for n, d in ((a, da), (b, db))
            if isinstance(arguments.get(n), torch.Tensor) and d < arguments[n].dim()
        }
        return (
            f"{type(container).__name__}: input {a!r} dimension {da} is {size.get(a, '?')}, but {b!r} dimension "
            f"{db} is {size.get(b, '?')}; the captured model needs them equal (the model's code relates them, "
            f"e.g. both are the batch). Pass inputs whose sizes agree."
        )
    if m is None:
        shapes = {k: tuple(v.shape) for k, v in arguments.items() if isinstance(v, torch.Tensor)}
        return (
            f"{type(container).__name__} was captured for inputs satisfying {guard}, which these inputs (shapes "
            f"{shapes}) do not. Call it with inputs like the example inputs, or transform with example inputs "
            f"of the shapes you will use."
        )
    name, dim, op, bound = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    value = arguments.get(name)
    got = f"is {value.shape[dim]}" if isinstance(value, torch.Tensor) and dim < value.dim() else "differs"
    what = f"{type(container).__name__}: input {name!r} dimension {dim} {got}"
    if op == "==":
        example = _example_size(gm, name, dim)
        if bound <= 1:
            return (
                f"{what}, but the capture fixed it to {bound}: torch.export specialises a dimension whose example "
                f"size was {bound} (sizes 0 and 1 always are). Transform again with example inputs of another size "
                f"along that dimension (e.g. an example batch of 2 or more) to keep it dynamic."
            )
        if example is None or example == bound:
            return (
                f"{what}, but the capture fixed it to {bound}, the example's size: by default only the batch and "
                f"the sequence stay dynamic (image height/width and other geometry are fixed), or the model fixes "
                f'it. Transform with dynamic="all" (or a torch.export dynamic_shapes spec naming this dimension) '
                f"to keep it free, or call with size {bound} there."
            )
        return f"{what}; the captured model accepts only {bound} there."
    limit = {"<=": "at most", "<": "less than", ">=": "at least", ">": "more than"}[op]
    hint = ""
    config = getattr(getattr(container, "model", None), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if getattr(config, key, None) == bound:
            hint = f" (the model's {key} = {bound})"
            break
    return (
        f"{what}; the model allows {limit} {bound} there{hint}: a limit of the model itself, not of the "
        f"capture. Shorten or split the input."
    )


def _unequal_dims(arguments: dict, gm: fx.GraphModule) -> str | None:
    """If two inputs whose sizes along a dimension were equal in the example (a batch, a sequence) now differ,
    say so — the usual cause of an index error inside a captured graph; else None."""
    seen: dict[tuple[int, int], tuple[str, int]] = {}
    for name, value in arguments.items():
        if not isinstance(value, torch.Tensor):
            continue
        for dim in range(min(value.dim(), 2)):
            example = _example_size(gm, name, dim)
            if example is None:
                continue
            key = (dim, example)
            if key in seen and seen[key][1] != value.shape[dim]:
                other, size = seen[key]
                return (
                    f"input {name!r} dimension {dim} is {value.shape[dim]}, but {other!r} dimension {dim} is "
                    f"{size}; they were equal ({example}) in the example inputs the model was captured with. "
                    f"Pass inputs whose batch (and sequence) sizes agree."
                )
            seen.setdefault(key, (name, value.shape[dim]))
    return None


class GraphContainer(nn.Module):
    """Runs `self._graphs[mode]` for the current mode. Subclasses register the state the graphs use."""

    # transformers.Trainer passes `num_items_in_batch` to any forward with **kwargs unless told otherwise;
    # a captured graph takes exactly the example inputs' arguments.
    accepts_loss_kwargs = False

    def __init__(self):
        super().__init__()
        # Plain attributes (not submodules): the graphs share the container's children.
        object.__setattr__(self, "_graphs", {})
        object.__setattr__(self, "_signatures", {})
        object.__setattr__(self, "_reference_name", None)  # a base weight, to see device / dtype moves
        object.__setattr__(self, "_graph_device", None)
        object.__setattr__(self, "_graph_dtype", None)

    # -- building -------------------------------------------------------------------------------
    def _set_graph(self, mode: str, graph: fx.Graph) -> fx.GraphModule:
        gm = fx.GraphModule(self, graph)
        # GraphModule copies attribute paths into fresh containers; point its top-level names at ours.
        for name in list(gm._modules):
            if name in self._modules:
                gm._modules[name] = self._modules[name]
        self._graphs[mode] = gm
        self._signatures[mode] = inspect.signature(gm.forward)
        return gm

    def _set_reference(self, name: str | None):
        """Name (in this module) of a floating-point base tensor whose device/dtype the graphs follow.
        Kept as a name: `.to()` may replace the tensor object (e.g. to or from "meta")."""
        object.__setattr__(self, "_reference_name", name)
        tensor = self._reference
        if tensor is not None:
            object.__setattr__(self, "_graph_device", tensor.device)
            object.__setattr__(self, "_graph_dtype", tensor.dtype)

    def graph(self, mode: str | None = None) -> fx.Graph:
        """The captured graph of `mode` (default: the current one)."""
        return self.graph_module(mode).graph

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self._graphs)

    def graph_module(self, mode: str | None = None) -> fx.GraphModule:
        """The GraphModule running `mode` (default: the current one)."""
        mode = mode or ("train" if self.training else "eval")
        try:
            return self._graphs[mode]
        except KeyError:
            raise ConfigError(
                f"{type(self).__name__} holds graphs for modes {list(self._graphs)}, not {mode!r}; "
                f"transform with modes=('train', 'eval') to switch between training and evaluation"
            ) from None

    @property
    def _reference(self) -> torch.Tensor | None:
        name = self._reference_name
        if name is None:
            return None
        mod_name, _, field = name.rpartition(".")
        mod = self.get_submodule(mod_name) if mod_name else self
        return getattr(mod, field)

    # -- running --------------------------------------------------------------------------------
    def _sync_device(self):
        ref = self._reference
        if ref is None:
            return
        if ref.dtype != self._graph_dtype:
            raise ConfigError(
                f"the base weights changed dtype from {self._graph_dtype} to {ref.dtype} after capture; the "
                f"captured graph's casts were traced for {self._graph_dtype}. Convert the model's dtype first, "
                f"then call neat_fx.transform (adapters themselves stay float32 unless adapter_dtype says otherwise)."
            )
        if ref.device != self._graph_device:
            for gm in self._graphs.values():
                retarget_devices(gm.graph, self._graph_device, ref.device)
                gm.recompile()
            object.__setattr__(self, "_graph_device", ref.device)

    def _apply(self, fn, recurse=True):
        ref = self._reference
        if ref is not None and ref.is_floating_point():
            probe = fn(torch.empty(0, dtype=ref.dtype, device=ref.device))
            if isinstance(probe, torch.Tensor) and probe.dtype != ref.dtype:
                raise ConfigError(
                    f"{type(self).__name__} cannot change dtype after capture ({ref.dtype} → {probe.dtype}): "
                    f"the captured graph's casts were traced for {ref.dtype}. Convert the model first, then "
                    f"transform it. Moving between devices with .to(device) is supported."
                )
        result = super()._apply(fn, recurse)
        self._sync_device()
        return result

    def _entry(self, mode: str, gm: fx.GraphModule):
        """What runs a call in `mode`: the flat graph (NeatModule may run it as blocks instead)."""
        return gm

    def forward(self, *args, **kwargs):
        mode = "train" if self.training else "eval"
        gm = self.graph_module(mode)
        ref = self._reference
        if ref is not None and ref.is_meta and not torch.compiler.is_compiling():
            raise ConfigError(
                f"{type(self).__name__} holds weights on the meta device (built without storage): load them before "
                f"calling it: nm.to_empty(device=...) then model.load_state_dict(state_dict, assign=False) (or "
                f"FSDP2's sharded init: fully_shard the blocks and nm, to_empty, load per shard)."
            )
        bound = self._bind(mode, args, kwargs)
        self._sync_device()
        run = self._entry(mode, gm)
        return self._run_checked(lambda: run(*args, **kwargs), bound, gm)

    def _bind(self, mode: str, args, kwargs) -> inspect.BoundArguments:
        """The call's arguments bound to the captured signature; InputMismatchError naming both otherwise."""
        try:
            return self._signatures[mode].bind(*args, **kwargs)
        except TypeError as exc:
            expected = ", ".join(self._signatures[mode].parameters)
            raise InputMismatchError(
                f"{type(self).__name__} was captured with inputs ({expected}) and cannot take this call "
                f"({exc}). Call it with the same argument structure as example_inputs, or transform again with "
                f"example inputs that include every argument you pass (e.g. labels=…)."
            ) from None

    def _run_checked(self, call, bound: inspect.BoundArguments, gm: fx.GraphModule):
        """`call()`, with torch.export's input guards and mismatched dimensions told as InputMismatchError."""
        if torch.compiler.is_compiling():
            return call()
        try:
            return call()
        except AssertionError as exc:  # torch.export's input guards
            if "Guard failed" not in str(exc):
                raise
            raise InputMismatchError(_explain_guard(str(exc), bound.arguments, gm, self)) from None
        except (IndexError, RuntimeError) as exc:
            unequal = _unequal_dims(bound.arguments, gm)
            if unequal is None:
                raise
            raise InputMismatchError(unequal) from exc


def tensor_version(t: torch.Tensor) -> int | None:
    """A tensor's version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


#: attribute merge_into leaves on a parameter it wrote W0 + ΔW into: (W0, the parameter's version after the write).
MERGED_MARK = "_neat_fx_merged_from"


@dataclass(frozen=True)
class SiteInfo:
    """One adapted weight, as `neat_fx.sites(nm)` reports it."""

    name: str  # qualified parameter name in the model
    key: str  # key of its adapter in nm.adapters
    kinds: str  # ops that use it (kinds of neat_fx.ops.OPS): linear, matmul, mm, addmm, einsum
    layout: str  # "out_in" (nn.Linear, W @ x) or "in_out" (Conv1D, x @ W)
    d_in: int
    d_out: int
    uses: int  # op nodes using it, over all modes' graphs (tied weights: several)
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    shared_with_other_ops: bool  # also used outside linear ops (e.g. an embedding tied to the head)
    # the aliases through which the linear ops read it (all of them unless tied to an embedding): where
    # merge_into and generate put W0 + ΔW; the other aliases keep W0.
    linear_paths: tuple[str, ...] = ()
    # E for a 3-D stack of routed experts, shape (E, ·, ·), one NEAT per expert (d_in, d_out are one expert's); 0
    # for a 2-D weight (neat_fx.experts)
    experts: int = 0
    # the format the base weight is held in ("torchao.nf4", "bnb.nf4", …; neat_fx.quantized), None when plain: then
    # `shape` and `dtype` are those of the dequantized weight, and W0 is the dequantized weight
    quantization: str | None = None

    @property
    def untied_paths(self) -> tuple[str, ...]:
        """The aliases that keep W0 when the linear uses get W0 + ΔW (the embedding of a tied head)."""
        return tuple(a for a in self.aliases if a not in self.linear_paths) if self.shared_with_other_ops else ()


# ids of NeatModules whose adapters are off in the current context (thread / asyncio task): disable_adapters
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("neat_fx_disabled", default=frozenset())


def adapters_active(nm: nn.Module) -> bool:
    return id(nm) not in _DISABLED.get()


@contextlib.contextmanager
def adapters_disabled(nm: nn.Module):
    """Within the block, `nm` and its eager views (neat_fx.eager, neat_fx.hf.wrap) compute the base model: W0, and
    the original of every parameter trained in full. Only this thread / task is affected."""
    token = _DISABLED.set(_DISABLED.get() | {id(nm)})
    try:
        yield
    finally:
        _DISABLED.reset(token)


class NeatModule(GraphContainer):
    """Created by `neat_fx.transform`. Called like the model; returns what the model returns.

    `neat_config` is the NeatConfig it was built with. Children: `model` (the user's model, frozen, shared),
    `adapters` (one NeatAdapter per site),
    `trainable` (copies of base parameters trained in full), `extras` (constants of the capture),
    `base_weights` (W0 kept after `merge_into` wrote W0 + ΔW into the model).
    """

    #: runs the base model's own code for a module whose adapters are off (set by neat_fx.eager, which the package
    #: imports: the eager view lives above this module)
    _run_base = None

    def __init__(self, model: nn.Module, config: NeatConfig):
        super().__init__()
        self.model = model
        self.adapters = nn.ModuleDict()
        self.trainable = nn.ParameterDict()
        self.extras = nn.Module()
        self.base_weights = nn.Module()
        self.neat_config = config
        self.site_infos: list[SiteInfo] = []
        self.trainable_names: dict[str, str] = {}  # key in self.trainable -> model parameter name
        object.__setattr__(self, "_block_names", [])  # the model's blocks (neat_fx.blocks), by the model's names
        object.__setattr__(self, "_checkpointed", frozenset())
        object.__setattr__(self, "_runners", {})  # mode -> _Runner (the flat graph split into blocks)

    @property
    def config(self):
        """The wrapped model's own `config` (a Hugging Face PretrainedConfig), or None — what integrations that
        read `model.config` expect (the Trainer sets `use_cache` on it). NEAT's options are `neat_config`."""
        return getattr(self.model, "config", None)

    # -- introspection ----------------------------------------------------------------------------
    def sites(self) -> list[SiteInfo]:
        return list(self.site_infos)

    def weight_of(self, site: SiteInfo) -> torch.Tensor:
        """W0 of a site: the base weight this module computes ΔW from (dequantized, computed at each call, when the
        base holds it quantized: neat_fx.quantized)."""
        w = self.base_tensor(site)
        if site.quantization:
            from .quantized import dequantize

            return dequantize(w)
        return w

    def base_tensor(self, site: SiteInfo) -> torch.Tensor:
        """The tensor W0 is held in: the model's parameter (a quantized one as it is), or nm's own copy after a
        merge wrote into the model's."""
        self.follow_merges()
        if site.key in self.base_weights._buffers:
            return self.base_weights._buffers[site.key]
        return self.model.get_parameter(site.name)

    # -- the base weights: shared with the model until a merge writes W0 + ΔW into them ----------------
    def own_base_weight(self, site: SiteInfo, w0: torch.Tensor):
        """Keep `w0` as this module's own W0 of `site` and point the graphs at it (before a merge overwrites the
        model's weight, or once another module has merged into a weight this one shares)."""
        self.base_weights.register_buffer(site.key, w0)
        targets = {"model." + a for a in (site.name, *site.aliases)}
        for mode in self.modes:
            gm = self.graph_module(mode)
            changed = False
            for node in gm.graph.nodes:
                if node.op == "get_attr" and node.target in targets:
                    node.target = "base_weights." + site.key
                    changed = True
            if changed:
                gm._modules["base_weights"] = self.base_weights
                gm.recompile()
        object.__setattr__(self, "_shared_weights", None)

    def _record_base_versions(self):
        """The version counter of every shared base weight now: a merge mark newer than this is another
        module's merge (see follow_merges)."""
        versions = {s.key: tensor_version(self.model.get_parameter(s.name)) for s in self.site_infos}
        object.__setattr__(self, "_base_versions", versions)
        object.__setattr__(self, "_shared_weights", None)

    def follow_merges(self):
        """If another NeatModule has merged W0 + ΔW into a weight this one shares, switch to that W0 (which the
        merge leaves as a mark on the parameter), so this module goes on computing its own function."""
        shared = self.__dict__.get("_shared_weights")
        if shared is None:
            shared = [
                (s, self.model.get_parameter(s.name))
                for s in self.site_infos
                if s.key not in self.base_weights._buffers
            ]
            object.__setattr__(self, "_shared_weights", shared)
        versions = self.__dict__.get("_base_versions", {})
        for site, weight in shared:
            mark = getattr(weight, MERGED_MARK, None)
            if mark is not None and mark[1] == tensor_version(weight) and versions.get(site.key) != mark[1]:
                # a quantized W0 is the base's own parameter object, replaced (not written) by the merge: kept as is
                self.own_base_weight(site, mark[0] if site.quantization else mark[0].clone())
            elif site.linear_paths and site.shared_with_other_ops:
                # another module's merge untied the head: its path holds that module's W0 + ΔW now
                head = self.model.get_parameter(site.linear_paths[0])
                if head is not weight and getattr(head, MERGED_MARK, None) is not None:
                    self.own_base_weight(site, weight.detach())  # the embedding keeps W0, never written

    def forward(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self.follow_merges()
            if not adapters_active(self):  # inside disable_adapters(): the base model's own code on W0
                return type(self)._run_base(self, *args, **kwargs)
            if torch.is_grad_enabled() and any(s.quantization for s in self.site_infos):
                from .quantized import recompute_in_backward

                with recompute_in_backward():  # one site's dequantized weight at a time (neat_fx.quantized)
                    return super().forward(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def disable_adapters(self):
        """`with nm.disable_adapters():` nm computes the base model exactly — W0 at every site, the original of every
        parameter trained in full — in this thread / task only (other threads keep the adapters): a reference for
        DPO-style losses, or an evaluation against the base. Nothing is switched on a module. (After `merge_into`,
        a parameter trained in full is the model's merged one: nm keeps W0 of its sites, not those originals.)"""
        return adapters_disabled(self)

    def _apply(self, fn, recurse=True):
        object.__setattr__(self, "_shared_weights", None)  # .to() may replace parameter objects
        ref = self._reference
        was_meta = ref is not None and ref.is_meta
        result = super()._apply(fn, recurse)
        ref = self._reference
        if was_meta and ref is not None and not ref.is_meta:
            # to_empty from the meta device leaves the adapters as uninitialised memory: give them the values
            # transform would have given them on the real model (same seed, same order)
            self.reset_adapters()
            _warn_unsaved_buffers(self.model)
        return result

    @torch.no_grad()
    def reset_adapters(self, seed: int | None = None):
        """Initialise every adapter as transform does: A and the r×r layers Kaiming-uniform, B zero (ΔW = 0),
        drawn in site order from `seed` (default: the transform's seed; None there: torch's global RNG).
        Sharded adapters (FSDP2) keep their part on each rank."""
        from .adapters import NeatAdapter
        from .distributed import copy_into

        seed = self.neat_config.seed if seed is None else seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for site in self.site_infos:
            ad = self.adapters[site.key]
            fresh = NeatAdapter(
                ad.d_in,
                ad.d_out,
                ad.rank,
                ad.hidden_layers,
                ad.activation,
                ad.scale,
                ad.layout,
                dtype=ad.A.dtype,
                device="cpu",
                generator=generator,
                experts=getattr(ad, "experts", 0),
            )
            for p, q in zip(ad.parameters(), fresh.parameters()):
                copy_into(p, q.to(p.dtype))

    # -- blocks: the model's layers as units (per-block FSDP2, activation checkpointing) ----------------------
    def _set_blocks(self, names: list[str]):
        object.__setattr__(self, "_block_names", list(names))
        object.__setattr__(self, "_runners", {})
        object.__setattr__(self, "_block_module_list", None)

    def _runner(self, mode: str) -> _Runner:
        """The graph of `mode` split into a root graph calling one unit per block (built on first need, rebuilt
        when the flat graph has changed)."""
        gm = self.graph_module(mode)
        runner = self._runners.get(mode)
        if runner is None or runner.source is not gm or runner.code != gm.code:
            runner = _build_runner(self, mode, gm)
            self._runners[mode] = runner
        return runner

    def blocks(self) -> list[str]:
        """The blocks this module runs as units in every mode, by the model's names: the modules that
        `fully_shard` and activation checkpointing may take (neat_fx.submodule gives each)."""
        units = None
        for mode in self.modes:
            names = set(self._runner(mode).units)
            units = names if units is None else units & names
        return [n for n in self._block_names if n in (units or ())]

    def block_module(self, name: str) -> nn.Module:
        """The model's own module of block `name` (model-relative, or with nm's "model." prefix), after checking
        that every mode runs it as a unit."""
        names = self._block_names
        name = _units.model_relative(name, names)
        if name not in names:
            raise ConfigError(f"{name!r} is not a block of this NeatModule; its blocks: {short_names(names)}")
        for mode in self.modes:
            runner = self._runner(mode)
            if name not in runner.units:
                raise ConfigError(
                    f"block {name!r} cannot run as a unit in {mode} mode: "
                    f"{runner.refused.get(name, 'not split')}. Shard or "
                    f"checkpoint its parent or its children instead."
                )
        return self.model.get_submodule(name)

    @property
    def checkpointed(self) -> tuple[str, ...]:
        """The blocks run under activation checkpointing (set_checkpointing)."""
        return tuple(n for n in self._block_names if n in self._checkpointed)

    def set_checkpointing(self, blocks=True):
        """Recompute the activations of `blocks` in the backward pass instead of keeping them: True = every
        innermost block (a transformer layer; a Swin block, not its stage), False/None = none, or block names /
        globs. Equal gradients, less memory, one more forward per block."""
        if blocks is None or blocks is False:
            chosen = frozenset()
        else:
            units = self.blocks()
            if blocks is True:
                chosen = frozenset(n for n in units if not any(o.startswith(n + ".") for o in units))
                if not chosen:
                    raise ConfigError(
                        f"checkpointing needs blocks, and {type(self.model).__name__} has none that run as units "
                        f"(blocks are the elements of its nn.ModuleLists: {short_names(self._block_names)}); pass "
                        f"blocks=[module names] to neat_fx.transform"
                    )
            else:
                chosen = set()
                for item in _units.as_names(blocks, "checkpointing"):
                    item = _units.model_relative(item, units)
                    hit = [n for n in units if n == item or fnmatch.fnmatchcase(n, item)]
                    if not hit:
                        raise ConfigError(
                            f"checkpoint: {item!r} is not a block of this {type(self).__name__}; blocks that run "
                            f"as units: {short_names(units)}"
                        )
                    chosen.update(hit)
                chosen = frozenset(chosen)
        object.__setattr__(self, "_checkpointed", chosen)
        for runner in self._runners.values():
            for name, unit in runner.units.items():
                unit.checkpoint = name in chosen

    def _entry(self, mode: str, gm: fx.GraphModule):
        """The flat graph, unless a block must run as a unit: checkpointing is on, or a block module has forward
        hooks (FSDP2's unshard/reshard, composable checkpointing, the user's own)."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self._refuse_foreign_units()
        if not self._block_names:
            return gm
        if not self._checkpointed and not any(_units.has_hooks(m) for m in self._block_modules()):
            return gm
        if not compiling:
            _units.refuse_composable_checkpoint(self._block_names, self._block_modules())
        runner = self._runner(mode)
        if not compiling:
            for name, module in zip(self._block_names, self._block_modules()):
                if name in runner.refused and (_units.has_hooks(module) or name in self._checkpointed):
                    raise ConfigError(
                        f"block {name!r} has forward hooks (fully_shard or checkpointing applied to it?) but "
                        f"cannot run as a unit in {mode} mode: {runner.refused[name]}. Apply them to its parent "
                        f"or its children instead."
                    )
        return runner.root

    def _block_modules(self) -> list[nn.Module]:
        cached = self.__dict__.get("_block_module_list")
        if cached is None:
            cached = [self.model.get_submodule(n) for n in self._block_names]
            object.__setattr__(self, "_block_module_list", cached)
        return cached

    def _refuse_foreign_units(self):
        """fully_shard on a module the graph does not call as a unit would leave its weights sharded in the
        graph (torch's "mixed torch.Tensor and DTensor"); say which module and what the units are."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        blocks = set(self._block_names)
        for name, _ in _units.fsdp_modules(self.model):
            if name not in blocks:
                raise ConfigError(
                    f"fully_shard was applied to {'model.' + name if name else 'the model itself (nm.model)'}, which "
                    f"this NeatModule does not run as a unit (it "
                    f"runs one captured graph; only its blocks and the module itself can be FSDP units). Its "
                    f"blocks: {short_names(self.blocks())}. Use fully_shard(neat_fx.submodule(nm, block)) for each "
                    f"block, then fully_shard(nm)."
                )

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Hugging Face's `PreTrainedModel.num_parameters` contract (the Trainer calls it): an int. Embeddings
        are the weights of nn.Embedding modules of the model."""
        trainable, total = self.parameter_counts()
        if only_trainable:
            return trainable
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in self.model.modules() if isinstance(m, nn.Embedding))
        return total

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total): total = the model's parameters + the adapters' (a trained-in-full copy
        replaces its original, so it is not counted twice)."""
        model_total = sum(p.numel() for p in self.model.parameters())
        adapters = sum(p.numel() for p in self.adapters.parameters())
        full = sum(p.numel() for p in self.trainable.parameters() if p.requires_grad)
        trainable = full + sum(p.numel() for p in self.adapters.parameters() if p.requires_grad)
        return trainable, model_total + adapters

    def summary(self) -> str:
        rows = [("site", "ops", "d_in", "d_out", "adapter params")]
        for s in self.site_infos:
            n = self.adapters[s.key].num_parameters()
            name = s.name
            if s.shared_with_other_ops:  # the row is the head; its embedding twin keeps W0
                name = (
                    f"{', '.join(s.linear_paths) or s.name} [tied to {', '.join(s.untied_paths) or 'non-linear ops'}]"
                )
            rows.append(
                (
                    name + (f" (×{s.uses})" if s.uses > len(self.modes) else ""),
                    s.kinds,
                    str(s.d_in),
                    str(s.d_out),
                    f"{n:,}",
                )
            )
        for key, name in self.trainable_names.items():
            p = self.trainable[key]
            rows.append((name, "trained in full", "", "", f"{p.numel():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append(
                "  ".join(c.ljust(w) if j == 0 or j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
            )
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        trainable, total = self.parameter_counts()
        c = self.neat_config
        if any(s.shared_with_other_ops for s in self.site_infos):
            lines.append(
                "[tied to …]: the weight is also read by non-linear ops (an embedding), which keep W0; fold and"
            )
            lines.append("merge_into untie it, the adapted uses get their own W0 + ΔW.")
        lines.append("")
        lines.append(
            f"NEAT rank={c.rank} depth={c.depth} activation={c.activation} scale={c.scale:g} · "
            f"{len(self.site_infos)} sites · modes {', '.join(self.modes)}"
        )
        lines.append(f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f} %)")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        t, n = self.parameter_counts()
        return f"sites={len(self.site_infos)}, trainable={t:,}, total={n:,}"


class FoldedModule(GraphContainer):
    """What `fold` returns: the captured graphs without adapter ops, weights `W0 + ΔW`.

    Its state is a mirror of the model's attribute paths (`model.<name>`): unchanged tensors are shared
    with the model, folded ones are new. `state_dict()` keys are the model's own, prefixed by `model.`.
    """

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.extras = nn.Module()


@dataclass
class _Runner:
    """The flat graph of one mode split into blocks: `root` calls `units` (block name → BlockUnit)."""

    source: fx.GraphModule
    code: str
    root: fx.GraphModule
    units: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)


def _graph_module_over(container: nn.Module, extra: dict, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule for `graph` whose top-level names are the container's own children (GraphModule would copy
    the attribute paths into fresh modules; FSDP2 swaps parameters on the real ones) plus `extra`."""
    holder = nn.Module()
    for name, child in list(container._modules.items()) + list(extra.items()):
        holder._modules[name] = child
    gm = fx.GraphModule(holder, graph)
    for name in list(gm._modules):
        if name in holder._modules:
            gm._modules[name] = holder._modules[name]
    return gm


def _build_runner(nm: NeatModule, mode: str, gm: fx.GraphModule) -> _Runner:
    split = _units.split_graph(gm.graph, nm._block_names)
    units = nn.ModuleDict()  # not a child of nm: FSDP2 must reach each block's weights by one path only
    runner = _Runner(gm, gm.code, None, {}, dict(split.refused))
    for name in split.blocks:
        unit = _units.BlockUnit(name, nm.model.get_submodule(name))
        unit.checkpoint = name in nm._checkpointed
        units[_units.unit_key(name)] = unit
        runner.units[name] = unit
    extra = {_units.UNITS_ATTR: units}
    for name, graph in split.blocks.items():
        object.__setattr__(runner.units[name], "_gm", _graph_module_over(nm, extra, graph))
    runner.root = _graph_module_over(nm, extra, split.root)
    return runner


def _warn_unsaved_buffers(model: nn.Module):
    """After to_empty, buffers that no state dict holds (non-persistent: a rotary embedding's inv_freq) are
    uninitialised memory, and loading the weights will not fix them: name them."""
    import warnings

    names = [
        f"{name}.{b}" if name else b
        for name, module in model.named_modules()
        for b in module._non_persistent_buffers_set
        if module._buffers.get(b) is not None
    ]
    if names:
        warnings.warn(
            f"{type(model).__name__} left the meta device: its non-persistent buffers {short_names(names)} hold "
            f"uninitialised memory and are in no state dict; compute them again before training (a Hugging Face "
            f"rotary embedding: build it again, `model.model.rotary_emb = type(model.model.rotary_emb)(model.config)`"
            f"; torchtitan: model.init_weights()).",
            stacklevel=3,
        )
