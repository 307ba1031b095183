"""Blocks: the model's repeated units (transformer layers), each run by its own piece of the captured graph.

`transform` captures the whole model as one flat graph per mode; fold, export, serving and the compile
backend read that graph. For training at scale, a block must also be a *module call*: FSDP2 unshards a
unit's parameters in the unit's forward pre-hook, and activation checkpointing recomputes a region. So
the flat graph is split, by each node's `nn_module_stack`, into a root graph that calls one `BlockUnit` per
block, and one graph per block (nested blocks nest). A unit runs its graph *through the hooks of the
model's own block module*: `fully_shard(neat_fx.submodule(nm, "model.layers.3"))` shards the model's
layer itself (torchtitan's recipe, unchanged), and when nm runs that layer's graph, FSDP's pre-forward
hook gathers exactly that layer's weights.

The split graphs are derived from the flat ones on first need (a block with forward hooks, or
checkpointing asked) and rebuilt whenever a flat graph changes; without hooks or checkpointing nm runs
the flat graph, as fast as before. (docs/design.md, "Blocks")
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import ConfigError

#: node.meta key of adapter call nodes (set by transform): the adapter belongs to the block of its use.
SITE_META = "neat_site"
#: the attribute of the root / unit graphs that holds the units of one mode.
UNITS_ATTR = "neat_blocks"


# -- which modules are blocks ------------------------------------------------------------------------------
def candidate_blocks(model: nn.Module) -> list[str]:
    """The elements of every nn.ModuleList of `model` that hold parameters, in module order: a transformer's
    layers, a Swin stage and its blocks (nested lists give nested blocks)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for child_name, child in module.named_children():
                if any(True for _ in child.parameters()):
                    names.append(f"{name}.{child_name}" if name else child_name)
    return sorted(names, key=lambda n: order.get(n, len(order)))


def resolve_block_names(model: nn.Module, spec) -> list[str]:
    """`spec` → block names. None / True / "auto": candidate_blocks; False: none; a list of names or globs."""
    if spec is None or spec is True or spec == "auto":
        return candidate_blocks(model)
    if spec is False:
        return []
    items = as_names(spec, "blocks")
    modules = dict(model.named_modules())
    names = []
    for item in items:
        hit = [n for n in modules if n and (n == item or fnmatch.fnmatchcase(n, item))]
        if item not in modules:  # a glob: its outermost matches ("layers.*" means the layers, not their parts)
            hit = _outermost(hit)
        if not hit:
            raise ConfigError(
                f"blocks: {item!r} names no module of {type(model).__name__}; its repeated blocks (elements of "
                f"nn.ModuleLists with parameters) are {short_names(candidate_blocks(model))}"
            )
        names.extend(n for n in hit if n not in names)
    return names


def as_names(spec, what: str) -> list[str]:
    """A name or a list of names (strings), else ConfigError saying what `what` takes."""
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(
            f"{what} takes True, False, a module name or a list of module names (strings, globs allowed), got {spec!r}"
        )
    return list(items)


def short_names(names, limit: int = 8) -> str:
    """Names for an error message: the first `limit`, then how many more; "none" for no names."""
    names = list(names)
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def model_relative(name: str, names) -> str:
    """A block name as the model spells it: nm's own spelling ("model." + the model's name) is accepted too."""
    if name not in names and name.startswith("model.") and name[len("model.") :] in names:
        return name[len("model.") :]
    return name


# -- splitting a flat graph ------------------------------------------------------------------------------------
@dataclass
class Split:
    """The flat graph of one mode cut into a root graph and one graph per block (nested blocks nest)."""

    root: fx.Graph
    blocks: dict[str, fx.Graph] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # block → why it stays inline


def unit_key(name: str) -> str:
    return name.replace(".", "__")


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def _owners(graph: fx.Graph, names: set[str]) -> dict[fx.Node, str | None]:
    """The block of `names` each node belongs to (None: the enclosing graph). A node's module stack says it;
    an adapter follows the op it adapts; nodes without a stack (weights, casts, sizes) follow their users
    when all of them are in one block."""
    owner: dict[fx.Node, str | None] = {}
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op in ("placeholder", "output"):
            owner[node] = None
        elif SITE_META in node.meta and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
            owner[node] = owner.get(node.args[2])
        else:
            paths = _stack_paths(node)
            owner[node] = next((p for p in paths if p in names), None) if paths else ...
    for node in reversed(nodes):  # stack-less nodes: by their users, users first
        if owner[node] is ...:
            users = {owner.get(u) for u in node.users}
            owner[node] = users.pop() if len(users) == 1 and None not in users and ... not in users else None
    return owner


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def split_graph(graph: fx.Graph, names: list[str]) -> Split:
    """Cut the blocks `names` out of a copy of `graph` (the original is left as it is)."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of the pytree spec warns about a deprecated API
        root = copy.deepcopy(graph)
    out = Split(root)
    _split_into(root, names, out)
    return out


def _split_into(graph: fx.Graph, names: list[str], out: Split):
    outer = _outermost(names)
    owner = _owners(graph, set(outer))
    regions: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if owner.get(node) not in (None, ...):
            regions.setdefault(owner[node], []).append(node)
    for name in outer:
        order = {n: i for i, n in enumerate(graph.nodes)}  # again after each cut: it adds call nodes
        region = regions.get(name)
        why = _cut(graph, name, region, order, out) if region else "the captured graph runs none of its code"
        inner = [n for n in names if n.startswith(name + ".")]
        if why:
            out.refused[name] = why
            for n in inner:  # they stay inline with it
                out.refused[n] = f"it is inside block {name!r}, which stays inline: {why}"
        elif inner:
            _split_into(out.blocks[name], inner, out)
    graph.lint()


def _cut(graph: fx.Graph, name: str, region: list[fx.Node], order: dict, out: Split) -> str | None:
    members = set(region)
    last = region[-1]
    inputs: list[fx.Node] = []
    outputs: list[fx.Node] = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in inputs:
                inputs.append(arg)
        outside = [u for u in node.users if u not in members]
        if any(order[u] < order[last] for u in outside):
            return (
                "the model runs code outside the block between parts of it (a block called more than once, "
                "or shared by several places, e.g. weight-shared layers)"
            )
        if outside:
            outputs.append(node)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for x in inputs:
        env[x] = sub.placeholder(x.name)
        env[x].meta = dict(x.meta)
    for node in region:
        env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    with graph.inserting_after(last):
        call = graph.call_module(f"{UNITS_ATTR}.{unit_key(name)}", tuple(inputs))
    call.meta["nn_module_stack"] = {}
    prev = call
    for i, o in enumerate(outputs):
        with graph.inserting_after(prev):
            item = graph.call_function(operator.getitem, (call, i))
        item.meta = dict(o.meta)
        o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        prev = item
    for node in reversed(region):
        graph.erase_node(node)
    out.blocks[name] = sub
    return None


# -- running one block through its module's hooks ----------------------------------------------------------------
def call_with_hooks(module: nn.Module, fn, args: tuple):
    """`fn(*args)` as if it were `module`'s forward: the module's forward pre-hooks and forward hooks run
    around it (FSDP2's unshard / reshard, composable checkpointing, a user's hooks), in nn.Module's order.
    The hooks see the block graph's inputs and outputs (tensors), not the Python signature of the block."""
    kwargs: dict = {}
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    output = fn(*args, **kwargs)
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)


class BlockUnit(nn.Module):
    """Runs the graph of one block in one mode, through the hooks of the model's block module, under
    activation checkpointing when asked. Holds no state of its own (the graph reads the container's)."""

    def __init__(self, name: str, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "block_name", name)
        object.__setattr__(self, "_block", block)  # not a child: the model owns it (one path for FSDP)
        object.__setattr__(self, "_gm", None)
        self.checkpoint = False

    def forward(self, *args):
        return call_with_hooks(self._block, self._run, args)

    def _run(self, *args, **kwargs):
        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._gm, *args, use_reentrant=False, **kwargs)
        return self._gm(*args, **kwargs)


def fsdp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules of `model` that `fully_shard` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def refuse_composable_checkpoint(names, modules):
    """torch.distributed._composable.checkpoint recomputes a module by calling its Python forward again, which
    cannot take a block graph's inputs: point to the checkpointing that recomputes the graph."""
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:
        return
    for name, module in zip(names, modules):
        if "checkpoint" in (_get_registry(module) or {}):
            raise ConfigError(
                f"torch.distributed._composable.checkpoint was applied to block {name!r}: it recomputes the "
                f"block by calling its Python forward, not the captured graph nm runs. Remove it and use "
                f"nm.set_checkpointing([{name!r}]) (or neat_fx.transform(..., checkpoint=True)), which composes "
                f"with fully_shard."
            )
