"""Fold: `W0 + ΔW` into constant weights — as a new plain module (`fold`) or into the user's model in
place (`merge_into`). ΔW is always computed in float32 from W0, never from an already merged weight
(docs/design.md, "The fold invariant")."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from . import capture as cap
from .containers import MERGED_MARK, FoldedModule, NeatModule, SiteInfo, tensor_version
from .distributed import any_sharded
from .errors import MergeError
from .ops import replace_weight
from .transform import MASTER_CAST

#: node.meta flag of the get_attr nodes fold creates for folded weights (their targets are already final).
FOLDED = "neat_folded"


def folded_weight(nm: NeatModule, site: SiteInfo) -> torch.Tensor:
    """W0 + ΔW of one site, in W0's dtype, ΔW from W0 (never from an already merged weight)."""
    return nm.adapters[site.key].folded_weight(nm.weight_of(site))


def _assign(root: nn.Module, path: str, value):
    *prefix, field = path.split(".")
    mod = root
    for part in prefix:
        nxt = mod._modules.get(part)
        if nxt is None:
            nxt = nn.Module()
            mod.add_module(part, nxt)
        mod = nxt
    if isinstance(value, nn.Parameter):
        mod.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(field, value)
    elif isinstance(value, nn.Module):
        mod.add_module(field, value)
    else:
        setattr(mod, field, value)


def fold(nm: NeatModule) -> FoldedModule:
    """A module computing what `nm` computes, with no adapter ops or parameters.

    Its graphs have the op counts of a plain capture of the model. `nm` is left untouched.
    """
    if not isinstance(nm, NeatModule):
        raise TypeError(f"fold expects a NeatModule from neat_fx.transform, got {type(nm).__name__}")
    _refuse_sharded(nm, "fold")
    out = FoldedModule()
    folded = {s.key: nn.Parameter(folded_weight(nm, s), requires_grad=False) for s in nm.site_infos}
    site_by_key = {s.key: s for s in nm.site_infos}
    values: dict[str, object] = {}  # new target -> object
    for mode in nm.modes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = copy.deepcopy(nm.graph(mode))
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target.startswith("adapters."):
                key = node.target[len("adapters.") :]
                weight, y = node.args[1], node.args[2]
                node.replace_all_uses_with(y)
                graph.erase_node(node)
                _fold_use(graph, y, weight, site_by_key[key], values, folded[key])
            elif node.meta.get(MASTER_CAST):  # the snapshot below is in the base dtype already
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        for node in list(graph.nodes):
            if node.op in ("get_attr", "call_module") and not node.meta.get(FOLDED):
                if node.op == "get_attr" and not node.users:
                    graph.erase_node(node)
                    continue
                old = node.target
                new = _mirror_target(nm, old)
                value = cap.resolve_attr(nm, old)
                if old.startswith("trainable."):  # a snapshot, in the base parameter's dtype
                    base_dtype = nm.model.get_parameter(new.removeprefix("model.")).dtype
                    value = nn.Parameter(value.detach().to(base_dtype, copy=True), requires_grad=False)
                values.setdefault(new, value)
                node.target = new
        graph.lint()
        out_graph = graph
        for target, value in values.items():
            if not cap.has_attr_path(out, target):
                if isinstance(value, nn.Parameter):
                    value = nn.Parameter(value.detach(), requires_grad=False) if value.requires_grad else value
                _assign(out, target, value)
        out._set_graph(mode, out_graph)
    ref = next((n for n, p in out.named_parameters() if p.is_floating_point()), None)
    if ref is None:
        ref = next((n for n, b in out.named_buffers() if b.is_floating_point()), None)
    out._set_reference(ref)
    out.train(nm.training)
    return out


def _refuse_sharded(nm: NeatModule, what: str):
    if any_sharded(nm):
        raise MergeError(
            f"{what}: nm's parameters are sharded (FSDP2); folding needs whole weights. Call "
            f"neat_fx.save_adapters(nm, DIR) on every rank, then, in one process, load them onto a plain model "
            f"(neat_fx.load_adapters(model, DIR, example_inputs)) and {what} that."
        )


def _mirror_target(nm: NeatModule, target: str) -> str:
    if target.startswith("trainable."):
        return "model." + nm.trainable_names[target[len("trainable.") :]]
    if target.startswith("base_weights."):
        key = target[len("base_weights.") :]
        return "model." + next(s.name for s in nm.site_infos if s.key == key)
    return target


def _fold_use(graph: fx.Graph, use: fx.Node, weight: fx.Node, site: SiteInfo, values: dict, folded):
    """Make `use` read the folded weight instead of `weight` (directly or through its transpose)."""
    # A weight also read by non-linear ops (an embedding tied to a head) is untied: those ops keep W0.
    target = f"folded.{site.key}" if site.shared_with_other_ops else "model." + site.name
    values[target] = folded
    new_weight = next((n for n in graph.nodes if n.meta.get(FOLDED) and n.target == target), None)
    if new_weight is None:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            new_weight = graph.get_attr(target)
        new_weight.meta[FOLDED] = True
    if not replace_weight(graph, use, weight, new_weight):
        raise RuntimeError(f"fold: cannot find the weight operand of {use.format_node()}")


@torch.no_grad()
def merge_into(model: nn.Module, nm: NeatModule) -> nn.Module:
    """Write `W0 + ΔW` (and the fully trained parameters) into `model` in place; returns `model`.

    Idempotent: ΔW is computed from W0, which `nm` keeps once it has merged into the model it shares
    weights with, so merging again (after more training, or twice) never counts ΔW twice, and `nm`
    goes on computing the same function. Every check runs before anything is written.
    """
    if not isinstance(nm, NeatModule):
        raise TypeError(f"merge_into expects a NeatModule from neat_fx.transform, got {type(nm).__name__}")
    _refuse_sharded(nm, "merge_into")
    plan = []
    for site in nm.site_infos:
        if site.shared_with_other_ops:
            raise MergeError(
                f"{site.name} is also read by ops that are not linear (e.g. an embedding tied to an output "
                f"head); writing W0 + ΔW into it would change those ops too. Use neat_fx.fold(nm) (which unties "
                f"it), or transform with exclude=[{site.name!r}]."
            )
        try:
            target = model.get_parameter(site.name)
        except AttributeError:
            raise MergeError(
                f"{type(model).__name__} has no parameter {site.name}; merge into the model nm was built from"
            ) from None
        w0 = nm.weight_of(site)
        if tuple(target.shape) != tuple(w0.shape):
            raise MergeError(f"{site.name} has shape {tuple(target.shape)} in the model, {tuple(w0.shape)} in nm")
        new = folded_weight(nm, site)
        if target is not w0:
            shared_live = nm.model.get_parameter(site.name) is target
            if not shared_live and not (torch.equal(target.cpu(), w0.cpu()) or torch.equal(target.cpu(), new.cpu())):
                raise MergeError(
                    f"{site.name} in {type(model).__name__} differs from the base weight nm was built on (and from "
                    f"its merged value); merge into the model nm was transformed from, or a fresh copy of it."
                )
        plan.append((site, target, new))
    train_plan = []
    for key, name in nm.trainable_names.items():
        try:
            target = model.get_parameter(name)
        except AttributeError:
            raise MergeError(f"{type(model).__name__} has no parameter {name} (trained in full by nm)") from None
        if target.shape != nm.trainable[key].shape:
            raise MergeError(
                f"{name} has shape {tuple(target.shape)} in the model, {tuple(nm.trainable[key].shape)} in nm"
            )
        train_plan.append((target, nm.trainable[key]))

    for site, target, new in plan:
        if nm.model.get_parameter(site.name) is target and site.key not in nm.base_weights._buffers:
            nm.own_base_weight(site, target.detach().clone())
        target.copy_(new.to(target.device))  # (not .data: copy_ moves the version counter compiled folds watch)
        # Other NeatModules built on this weight see the mark and switch to W0 (NeatModule.follow_merges).
        setattr(target, MERGED_MARK, (nm.weight_of(site).detach(), tensor_version(target)))
    for target, value in train_plan:
        target.copy_(value.detach().to(device=target.device, dtype=target.dtype))
    return model
