"""Fold: `W0 + ΔW` into constant weights — as a new plain module (`fold`) or into the user's model in
place (`merge_into`). ΔW is always computed in float32 from W0, never from an already merged weight
(docs/design.md, "The fold invariant")."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from . import capture as cap
from . import quantized
from .containers import MERGED_MARK, FoldedModule, NeatModule, SiteInfo, tensor_version
from .distributed import any_sharded
from .errors import MergeError
from .experts import has_experts
from .experts import remove as remove_experts
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
        if has_experts(graph):  # routed-expert stacks: the update nodes go, the stack's readers get W0 + ΔW
            remove_experts(graph, lambda key, _w, g=graph: _folded_node(g, site_by_key[key], values, folded[key]))
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
        quantized.drop_unread(graph)  # a quantized site's dequantize, now that its op reads W0_deq + ΔW
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
    # For neat_fx.generate, which runs the model's own code with the folded tensors in place of its own.
    object.__setattr__(out, "_source_model", nm.model)
    object.__setattr__(out, "_linear_paths", _generation_paths(nm))
    object.__setattr__(out, "_site_infos", list(nm.site_infos))
    return out


def _generation_paths(nm: NeatModule) -> dict[str, str]:
    """Attribute path in the model → attribute of the folded module holding W0 + ΔW, for every path a linear use
    reads a site through (a tied embedding's own path keeps W0)."""
    paths = {}
    for site in nm.site_infos:
        attr = f"folded.{site.key}" if site.shared_with_other_ops else "model." + site.name
        for path in site.linear_paths or site.aliases or (site.name,):
            paths[path] = attr
    for name in nm.trainable_names.values():
        paths[name] = "model." + name
    return paths


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


def _folded_node(graph: fx.Graph, site: SiteInfo, values: dict, folded) -> fx.Node:
    """The get_attr node of a site's folded weight in `graph` (made once)."""
    # A weight also read by non-linear ops (an embedding tied to a head) is untied: those ops keep W0.
    target = f"folded.{site.key}" if site.shared_with_other_ops else "model." + site.name
    values[target] = folded
    new_weight = next((n for n in graph.nodes if n.meta.get(FOLDED) and n.target == target), None)
    if new_weight is None:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            new_weight = graph.get_attr(target)
        new_weight.meta[FOLDED] = True
    return new_weight


def _fold_use(graph: fx.Graph, use: fx.Node, weight: fx.Node, site: SiteInfo, values: dict, folded):
    """Make `use` read the folded weight instead of `weight` (directly or through its transpose)."""
    new_weight = _folded_node(graph, site, values, folded)
    if not replace_weight(graph, use, weight, new_weight):
        raise RuntimeError(f"fold: cannot find the weight operand of {use.format_node()}")


@torch.no_grad()
def merge_into(model: nn.Module, nm: NeatModule, *, requantize: bool | None = None, example_inputs=None):
    """Write `W0 + ΔW` (and the fully trained parameters) into `model` in place; returns `model`.

    Idempotent: ΔW is computed from W0, which `nm` keeps once it has merged into the model it shares
    weights with, so merging again (after more training, or twice) never counts ΔW twice, and `nm`
    goes on computing the same function. Every check runs before anything is written.

    On a quantized base (sites on torchao / bitsandbytes weights; neat_fx.quantized) `requantize` must be given and
    a `quantized.MergeReport` is returned (its `.model` is `model`): False — each merged site leaves quantization, a
    plain weight `W0_deq + ΔW` in the base's compute dtype (a bitsandbytes layer becomes an nn.Linear); True —
    `W0_deq + ΔW` quantized again in the base's own format and block sizes, with the error that adds per site and,
    given `example_inputs`, in the outputs against nm's. On a float base `requantize` has no effect.
    """
    if not isinstance(nm, NeatModule):
        raise TypeError(f"merge_into expects a NeatModule from neat_fx.transform, got {type(nm).__name__}")
    _refuse_sharded(nm, "merge_into")
    quantized_sites = [s for s in nm.site_infos if s.quantization]
    if quantized_sites and requantize is None:
        formats = ", ".join(sorted({s.quantization for s in quantized_sites}))
        raise MergeError(
            f"{len(quantized_sites)} of nm's sites are on quantized weights ({formats}); say what the merged weights "
            f"become: merge_into(model, nm, requantize=False) gives plain {quantized_sites[0].dtype} weights W0 + ΔW "
            f"(exact, more memory), requantize=True quantizes W0 + ΔW again in the same format (same memory, plus a "
            f"quantization error the returned report measures; pass example_inputs= to see it in the outputs)"
        )
    reference = None
    if quantized_sites and example_inputs is not None:
        args, kwargs = cap.split_example_inputs(example_inputs)
        with cap.train_mode(nm, False):
            reference = nm(*args, **kwargs)
    qplan = [_plan_quantized(model, nm, site, bool(requantize)) for site in quantized_sites]
    plan = []
    untie = []  # (site, W0 holder in model, new W0 + ΔW): tied to non-linear uses, written at the linear paths only
    for site in nm.site_infos:
        if site.quantization:
            continue
        if site.shared_with_other_ops and not site.linear_paths:
            raise MergeError(
                f"{site.name} is read by linear and by other ops (e.g. an embedding and an output head) through "
                f"the same attribute, so merge_into cannot give the linear uses their own W0 + ΔW. Use "
                f"neat_fx.fold(nm) (which unties it in its graph), or transform with exclude=[{site.name!r}]."
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
        if site.shared_with_other_ops:
            if not torch.equal(target.cpu(), w0.cpu()):
                raise MergeError(
                    f"{site.name} in {type(model).__name__} differs from the base weight nm was built on; merge into "
                    f"the model nm was transformed from, or a fresh copy of it."
                )
            untie.append((site, target, new))
            continue
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
    for site, w0_holder, new in untie:
        _untie(model, nm, site, w0_holder, new)
    for target, value in train_plan:
        target.copy_(value.detach().to(device=target.device, dtype=target.dtype))
    if not quantized_sites:
        return model
    report = quantized.MergeReport(model, bool(requantize), [entry for *_, entry in qplan])
    plain_layers = []
    for site, original, new, _ in qplan:
        plain_layers += _write_quantized(model, nm, site, original, new)
    if plain_layers:
        quantized.record_unquantized(model, plain_layers)
    if reference is not None:
        with cap.train_mode(model, False):
            merged = quantized.eager_view(model)(*args, **kwargs)
        report.output_max, report.output_rel = _output_difference(reference, merged)
    return report


def _plan_quantized(model: nn.Module, nm: NeatModule, site: SiteInfo, requantize: bool):
    """(site, the base's quantized parameter, the parameter to write, its SiteMerge): every check and all the
    arithmetic of merging one quantized site, before anything is written."""
    if site.shared_with_other_ops:
        raise MergeError(
            f"{site.name} is quantized and read by other ops too (a tied embedding); merge_into cannot untie a "
            f"quantized weight. Use neat_fx.fold(nm), or transform with exclude=[{site.name!r}]."
        )
    try:
        target = model.get_parameter(site.name)
    except AttributeError:
        raise MergeError(
            f"{type(model).__name__} has no parameter {site.name}; merge into the model nm was built from"
        ) from None
    original = nm.base_weights._buffers.get(site.key)
    if original is None:
        original = nm.model.get_parameter(site.name)
    if target is not original and not getattr(target, MERGED_MARK, None):
        raise MergeError(
            f"{site.name} in {type(model).__name__} is not the quantized weight nm was built on (nor one merge_into "
            f"wrote); merge into the model nm was transformed from"
        )
    if requantize and quantized.format_of(original).startswith("bnb."):
        owner = site.name.rpartition(".")[0]
        if not quantized.is_bnb_layer(model.get_submodule(owner)):
            raise MergeError(
                f"{owner} was a bitsandbytes layer that an earlier merge_into(requantize=False) made an nn.Linear; "
                f"requantize=True needs the bitsandbytes layer: load the base again and merge into it"
            )
    w0 = quantized.dequantize(original)
    ad = nm.adapters[site.key]
    delta = ad.delta_weight(w0)
    merged = (w0.float() + delta).to(w0.dtype)
    entry = dict(
        name=site.name,
        format=site.quantization,
        dtype=str(w0.dtype).removeprefix("torch."),
        requantized=requantize,
        update_max=float(delta.abs().max()) if delta.numel() else 0.0,
    )
    if not requantize:
        new = nn.Parameter(merged, requires_grad=False)
    else:
        new = quantized.requantize(original, merged)
        error = (quantized.dequantize(new).float() - merged.float()).flatten()
        entry.update(
            error_max=float(error.abs().max()),
            error_rel=float(error.norm() / merged.float().norm().clamp_min(1e-30)),
        )
    return site, original, new, quantized.SiteMerge(**entry)


def _write_quantized(model: nn.Module, nm: NeatModule, site: SiteInfo, original, new):
    """Put `new` at every path of the site in `model` (a bitsandbytes layer left for a plain weight becomes an
    nn.Linear); nm keeps the quantized W0 it was built on, so it goes on computing its own function. Returns the
    names of the bitsandbytes layers made nn.Linears."""
    if nm.model is model and site.key not in nm.base_weights._buffers:
        nm.own_base_weight(site, original)
    replaced = []
    for path in site.aliases or (site.name,):
        owner_name, _, field = path.rpartition(".")
        owner = model.get_submodule(owner_name)
        if quantized.is_bnb_layer(owner) and quantized.format_of(new) is None:
            model.set_submodule(owner_name, quantized.plain_linear(owner, new))
            replaced.append(owner_name)
        else:
            setattr(owner, field, new)
    setattr(new, MERGED_MARK, (original, tensor_version(new)))  # for other modules built on this model
    return replaced


def _output_difference(expected, actual) -> tuple[float, float]:
    from .numerics import flat_tensors

    worst, scale = 0.0, 1.0
    for e, a in zip(flat_tensors(expected), flat_tensors(actual)):
        if e.is_floating_point() and e.numel():
            worst = max(worst, float((e.double() - a.double()).abs().max()))
            scale = max(scale, float(e.double().abs().max()))
    return worst, worst / scale


def _untie(model: nn.Module, nm: NeatModule, site: SiteInfo, w0_holder: nn.Parameter, new: torch.Tensor):
    """Give the linear uses of a weight tied to non-linear ones (an output head tied to the input embedding) their
    own parameter W0 + ΔW; the other uses keep W0. Writes into that parameter when an earlier merge made it."""
    current = model.get_parameter(site.linear_paths[0])
    if current is w0_holder:  # still tied: a new parameter, shared by the linear paths only
        if nm.model is model and site.key not in nm.base_weights._buffers:
            nm.own_base_weight(site, w0_holder.detach())  # nm's graphs read W0 through the head's path too
        head = nn.Parameter(new.to(w0_holder.device), requires_grad=w0_holder.requires_grad)
        for path in site.linear_paths:
            owner, _, field = path.rpartition(".")
            setattr(model.get_submodule(owner), field, head)
        _record_untied(model, site.linear_paths)
    else:
        head = current
        head.copy_(new.to(head.device))
    setattr(head, MERGED_MARK, (nm.weight_of(site).detach(), tensor_version(head)))


def _record_untied(model: nn.Module, paths: tuple[str, ...]):
    """Tell a Hugging Face model (transformers ≥ 5: `all_tied_weights_keys`, `config.tie_word_embeddings`) that
    `paths` are no longer tied, so `save_pretrained` writes them and `from_pretrained` does not tie them again."""
    maps = []
    for prefix, sub in model.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        for path in paths:
            if not prefix or path.startswith(prefix + "."):
                tied.pop(path[len(prefix) + 1 :] if prefix else path, None)
        maps.append((sub, tied))
    # The flag also ties encoder and decoder embeddings (BART, T5): cleared only when nothing else stays tied. A
    # checkpoint holding the head and the embedding with different values keeps them apart at load anyway.
    if maps and not any(tied for _, tied in maps):
        for sub, _ in maps:
            config = getattr(sub, "config", None)
            for c in (config, config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None):
                if getattr(c, "tie_word_embeddings", False):
                    c.tie_word_embeddings = False
