"""`transform`: capture → match → insert. Returns a `NeatModule` whose only trainable parameters are
the adapters (and the base parameters named by `trainable=`). (docs/design.md, "The stages")"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import fx, nn

from . import capture as cap
from . import quantized
from .adapters import NeatAdapter
from .config import NeatConfig
from .containers import FoldedModule, NeatModule, SiteInfo
from .errors import CaptureError, ConfigError, PatternError
from .experts import ExpertsAdapter
from .experts import insert as insert_experts
from .match import ALL_LINEAR, Site, describe_use, find_uses, matches, name_list, output_head_names, select
from .names import adapter_key
from .numerics import compare, flat_tensors
from .ops import Use
from .units import resolve_block_names

#: how close the captured graph must come to the eager model on the example inputs (of each output's scale).
CAPTURE_RTOL = 1e-4


def transform(
    model: nn.Module,
    patterns=None,
    example_inputs=None,
    *,
    rank: int | None = None,
    depth: int | None = None,
    activation: str | None = None,
    scale: float | None = None,
    exclude=None,
    trainable=None,
    adapter_dtype: str | None = None,
    capture: str | None = None,
    modes=None,
    seed: int | None = None,
    config: NeatConfig | None = None,
    dynamic=True,
    check: bool = True,
    blocks="auto",
    checkpoint=None,
) -> NeatModule:
    """Insert a NEAT adapter at every linear-like op whose weight matches `patterns`.

    model:          any nn.Module. Its parameters are frozen (requires_grad=False) and shared, not copied.
    patterns:       globs on weight names (with or without '.weight'), 're:' regexes, '*' for all, or
                    "all-linear": every linear-like weight but the output head (PEFT's meaning).
    example_inputs: a tuple of positional arguments or a dict of keyword arguments the model accepts.
    rank, depth, activation, scale, exclude, trainable, adapter_dtype, capture, modes, seed: the fields of
                    `NeatConfig` (documented there; None = its default: rank 8, depth 2, relu, scale 1.0,
                    capture "export", modes ("train", "eval")) — or pass them all as `config=` (then none of
                    them, and no patterns, may be passed beside it).
    dynamic:        True: the batch and sequence dimensions dynamic where the model allows, the rest static —
                    dim 0 of every input, dim 1 of inputs of rank 2-3 ((batch, length) ids, masks, audio;
                    (batch, length, features) embeddings), and later dims of a size equal to such a length
                    (4-D masks); image channels/height/width stay static (`capture.default_dynamic_dims`).
                    "all": every dimension dynamic where the model allows (slower to capture); False: static
                    shapes; or a torch.export `dynamic_shapes` spec.
    check:          compare the captured graph with the eager model on the example inputs.
    blocks:         the model's blocks, which nm can run one by one as units (per-block FSDP2, activation
                    checkpointing; neat_fx.submodule): "auto" = the elements of its nn.ModuleLists (transformer
                    layers), a list of module names / globs, or False.
    checkpoint:     recompute the activations of blocks in the backward pass: True = every innermost block, or
                    block names (NeatModule.set_checkpointing changes it later).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = dict(
        patterns=patterns,
        rank=rank,
        depth=depth,
        activation=activation,
        scale=scale,
        exclude=exclude,
        trainable=trainable,
        adapter_dtype=adapter_dtype,
        capture=capture,
        modes=modes,
        seed=seed,
    )
    config = _one_config(config, {k: v for k, v in options.items() if v is not None})
    _refuse_unknown_formats(dict(model.named_parameters(remove_duplicate=False)), config)  # before the capture
    block_names = resolve_block_names(model, blocks)  # a wrong name fails before the capture
    args, kwargs = cap.split_example_inputs(example_inputs)
    _warn_static_batch(args, kwargs, dynamic)

    # A model built on the meta device (no storage; weights loaded after) is captured without running it: its
    # outputs hold no values to check. (docs/design.md, "Big models")
    on_meta = _refuse_meta_options(model, config)
    if not on_meta:
        cap.refuse_non_finite(args, kwargs)
    check_values = check and not on_meta
    reference = cap.check_runs_eagerly(model, args, kwargs) if check_values else None
    how = dict(method=config.capture, modes=config.modes, dynamic=dynamic)
    # one capture serves both modes where it can: the eval graph derived from the train graph, checked on `reference`
    captures = cap.capture(model, args, kwargs, **how, reference=reference, rtol=CAPTURE_RTOL)
    nm = NeatModule(model, config)
    graphs = {mode: bind_targets(c, model, nm) for mode, c in captures.items()}

    chosen, train_params, other_uses = _select(nm, graphs, config)
    with restoring_requires_grad(model):  # a failure below leaves the model as it was given
        for p in model.parameters():
            p.requires_grad_(False)
        _make_trainable_copies(nm, train_params, graphs)
        _insert_adapters(nm, chosen, config, other_uses)
        _install_graphs(nm, model, graphs)
        nm._set_blocks(block_names)
        if checkpoint:
            nm.set_checkpointing(checkpoint)
        nm._record_base_versions()
        # DDP's broadcast of module states rewrites tensor-subclass weights in place (an NF4 weight came back 2.5e-3 off
        # on every rank, measured); they are frozen and every rank loads the same base, so DDP leaves them alone
        frozen = [n for n, p in nm.named_parameters() if quantized.format_of(p) is not None]
        if frozen:
            nm._ddp_params_and_buffers_to_ignore = frozen
        if check_values and "eval" in graphs:
            _check_capture(nm, model, args, kwargs, reference)
    return nm


def _refuse_meta_options(model: nn.Module, config: NeatConfig) -> bool:
    """Whether `model` is on the meta device; what a meta model cannot have (trainable copies would be copies of
    nothing: load the weights first). A model partly on meta is refused: say which parameters."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if not meta:
        return False
    real = [n for n, p in model.named_parameters() if not p.is_meta]
    if real:
        raise ConfigError(
            f"{type(model).__name__} is partly on the meta device ({len(meta)} parameters, e.g. {meta[0]}) and partly "
            f"not (e.g. {real[0]}); build it wholly on meta (with torch.device('meta'): ...) or load all its weights"
        )
    if config.trainable:
        raise ConfigError(
            f"trainable={list(config.trainable)} on a meta-device model: a trained-in-full copy would copy weights "
            f"that are not loaded yet. Load the weights (to_empty + load_state_dict) and transform the real model, "
            f"or leave trainable= out."
        )
    return True


@contextlib.contextmanager
def restoring_requires_grad(model: nn.Module):
    """Run the block; if it raises, give every parameter of `model` back the requires_grad it had."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _one_config(config: NeatConfig | None, given: dict) -> NeatConfig:
    """The configuration of a call: `config=` or the options given one by one, never both (an option beside a
    config would otherwise be silently ignored)."""
    if config is None:
        return NeatConfig(**given)
    if not isinstance(config, NeatConfig):
        raise ConfigError(f"config must be a neat_fx.NeatConfig, got {type(config).__name__}")
    if given:
        raise ConfigError(
            f"pass the options either in config= or one by one, not both: {', '.join(sorted(given))} given beside "
            f"config=. Use config=dataclasses.replace(config, {next(iter(sorted(given)))}=…) to change one."
        )
    return config


def _select(nm: NeatModule, graphs: dict, config: NeatConfig):
    """(sites to adapt, parameters to train in full, non-linear uses by parameter name)."""
    resolve = lambda target: cap.resolve_attr(nm, target)  # noqa: E731
    aliases = _aliases(nm.model)
    sites, other_uses = _collect_sites(graphs, resolve, aliases)
    param_names = dict(nm.model.named_parameters(remove_duplicate=False))
    chosen = select(sites, config.patterns, config.exclude, param_names, other_uses, output_head_names(nm.model))
    train_params = _select_trainable(config.trainable, param_names, chosen, aliases)
    return chosen, train_params, other_uses


def _refuse_unknown_formats(param_names: dict, config: NeatConfig):
    """A weight the patterns select that is held in a quantized format neat_fx does not know would be skipped
    silently (its graph reads it through the format's own ops): name it, the formats known and the fix."""
    for name, p in param_names.items():
        if not quantized.unknown_subclass(p) or any(matches(x, (name,)) for x in config.exclude):
            continue
        if any(pat.lower() == ALL_LINEAR or matches(pat, (name,)) for pat in config.patterns):
            raise PatternError(quantized.unknown_format_message(name, p))


def _install_graphs(container, model: nn.Module, graphs: dict):
    """Give `container` its graphs, the base weight whose device it follows, and the model's mode."""
    for mode, graph in graphs.items():
        graph.lint()
        container._set_graph(mode, graph)
    ref = next((n for n, p in model.named_parameters() if p.is_floating_point()), None)
    container._set_reference("model." + ref if ref else None)
    container.train(model.training)


def _warn_static_batch(args, kwargs, dynamic):
    if dynamic is not True and dynamic != "all":
        return
    leaves = flat_tensors((args, kwargs))
    if leaves and all(t.dim() >= 1 and t.shape[0] == 1 for t in leaves):
        warnings.warn(
            "example_inputs have batch size 1: torch.export specialises dimensions of size 1, so the "
            "captured module will only accept batch size 1. Pass an example batch of 2 or more.",
            stacklevel=3,
        )


def _aliases(model: nn.Module) -> dict[int, tuple[str, ...]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {k: tuple(v) for k, v in names.items()}


def capture_plain(model: nn.Module, example_inputs, *, modes=("eval",), dynamic=True, method="export"):
    """The model as a `FoldedModule` (graphs without adapters), sharing the model's weights: what the
    ONNX exporter works on when it is given a plain (e.g. merged) model."""
    args, kwargs = cap.split_example_inputs(example_inputs)
    cap.check_runs_eagerly(model, args, kwargs)
    captures = cap.capture(model, args, kwargs, method=method, modes=modes, dynamic=dynamic)
    out = FoldedModule()
    out.model = model
    _install_graphs(out, model, {mode: bind_targets(c, model, out) for mode, c in captures.items()})
    return out


def bind_targets(c: cap.Capture, model: nn.Module, nm: nn.Module) -> fx.Graph:
    """Point get_attr / call_module targets at `model.<name>` (shared state) or `nm.extras.<name>`."""
    graph = c.graph
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = node.target
        if cap.has_attr_path(model, target):
            node.target = "model." + target
            continue
        try:
            obj = cap.resolve_attr(c.owner, target)
        except AttributeError:
            raise CaptureError(
                f"captured graph refers to {target!r}, which neither the model nor the capture holds"
            ) from None
        name = f"{c.mode}__" + target.replace(".", "__")
        if isinstance(obj, nn.Module):
            nm.extras.add_module(name, obj)
        elif isinstance(obj, torch.Tensor):
            nm.extras.register_buffer(name, obj.detach(), persistent=False)
        else:
            setattr(nm.extras, name, obj)
        node.target = "extras." + name
    return graph


def _collect_sites(graphs, resolve, aliases):
    """Group the linear-like uses of all graphs by parameter (tied weights: one site; a 3-D stack of routed
    experts: one site of E experts, d_in and d_out per expert from the layout its ops read it in)."""
    by_param: dict[int, Site] = {}
    other_uses: dict[str, list[str]] = {}
    for graph in graphs.values():
        uses, other = find_uses(graph, resolve, experts=True)
        for u in uses:
            target = quantized.parameter_node(u.weight).target  # a quantized weight is read through dequantize
            p = resolve(target)
            names = aliases.get(id(p), (target.removeprefix("model."),))
            site = by_param.get(id(p))
            if site is None:
                shape = quantized.logical_shape(p)
                experts, matrix = (shape[0], shape[1:]) if len(shape) == 3 else (0, shape)
                d_out, d_in = matrix if u.layout == "out_in" else matrix[::-1]
                site = Site(names[0], target, tuple(shape), int(d_in), int(d_out), u.layout, [], names)
                site.experts = int(experts)
                by_param[id(p)] = site
            elif site.layout != u.layout:
                raise PatternError(
                    f"weight {site.name} is used both as x·Wᵀ and as x·W; one NEAT adapter cannot serve both. "
                    f"Exclude it with exclude=[{site.name!r}]."
                )
            site.uses.append(u)
        for target, users in other.items():
            try:
                p = resolve(target)
            except AttributeError:
                continue
            if not isinstance(p, nn.Parameter):
                continue
            for name in aliases.get(id(p), ()):
                other_uses.setdefault(name, []).extend(describe_use(n) for n in users)
    return list(by_param.values()), other_uses


def _select_trainable(patterns, param_names, chosen: list[Site], aliases) -> list[tuple[str, nn.Parameter]]:
    if not patterns:
        return []
    picked: dict[int, tuple[str, nn.Parameter]] = {}
    for pattern in patterns:
        hit = [(n, p) for n, p in param_names.items() if matches(pattern, (n,))]
        if not hit:
            raise PatternError(
                f"trainable pattern {pattern!r} matches no parameter; parameters: {name_list(param_names)}"
            )
        for _, p in hit:
            if quantized.format_of(p) is not None:
                raise PatternError(
                    f"trainable pattern {pattern!r} matches {aliases[id(p)][0]}, held quantized "
                    f"({quantized.format_of(p)}): a quantized weight cannot be trained in full. Adapt it instead "
                    f"(name it in the patterns), or narrow trainable= to float parameters (a head, norms)."
                )
            picked.setdefault(id(p), (aliases[id(p)][0], p))
    adapted = {s.name for s in chosen}
    both = sorted(n for n, _ in picked.values() if n in adapted)
    if both:
        raise PatternError(
            f"{', '.join(both)} would be both adapted and trained in full; remove it from trainable= or "
            f"add it to exclude="
        )
    return list(picked.values())


#: base dtypes whose trained-in-full copies are kept in float32 (optimizer steps in fp16 overflow and underflow:
#: AdamW's eps alone is 0 in float16), cast to the base dtype where the graph reads them.
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: node.meta flag of the casts from a float32 master copy to the base dtype (fold removes them).
MASTER_CAST = "neat_master_cast"


def _make_trainable_copies(nm: NeatModule, params, graphs):
    if not params:
        return
    key_of = {}
    for name, p in params:
        key = adapter_key(name)
        master = p.detach().clone().float() if p.dtype in HALF_DTYPES else p.detach().clone()
        nm.trainable[key] = nn.Parameter(master, requires_grad=True)
        nm.trainable_names[key] = name
        key_of[id(p)] = (key, p.dtype)
    for graph in graphs.values():
        for node in list(graph.nodes):
            if node.op != "get_attr":
                continue
            obj = cap.resolve_attr(nm, node.target)
            if id(obj) not in key_of:
                continue
            key, dtype = key_of[id(obj)]
            node.target = "trainable." + key
            if dtype in HALF_DTYPES:
                with graph.inserting_after(node):
                    cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
                cast.meta[MASTER_CAST] = True
                node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)


def _insert_adapters(nm: NeatModule, chosen: list[Site], config: NeatConfig, other_uses):
    dtype = config.dtype
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    keys = set()
    for site in chosen:
        key = adapter_key(site.name)
        while key in keys:
            key += "_"
        keys.add(key)
        weight = nm.model.get_parameter(site.name)
        adapter_class = NeatAdapter if not site.experts else functools.partial(ExpertsAdapter, site.experts)
        nm.adapters[key] = adapter_class(
            site.d_in,
            site.d_out,
            config.rank,
            config.hidden_layers,
            config.activation,
            config.scale,
            site.layout,
            dtype=dtype,
            device=weight.device,
            generator=generator,
        )
        if site.experts:  # one adapter call per graph, the update after each per-expert op (neat_fx.experts)
            by_graph: dict[fx.Graph, list] = {}
            for use in site.uses:
                by_graph.setdefault(use.node.graph, []).append(use)
            for graph, uses in by_graph.items():
                insert_experts(graph, uses, key)
        for use in site.uses if not site.experts else ():
            _insert_one(use, key)
        shared = any(a in other_uses for a in site.aliases)
        nm.site_infos.append(
            SiteInfo(
                name=site.name,
                key=key,
                kinds=site.kinds,
                layout=site.layout,
                d_in=site.d_in,
                d_out=site.d_out,
                uses=len(site.uses),
                aliases=site.aliases,
                shape=site.shape,
                dtype=str(quantized.compute_dtype(weight)).removeprefix("torch."),
                shared_with_other_ops=shared,
                linear_paths=linear_attribute_paths(nm.model, site) if shared else site.aliases,
                experts=site.experts,
                quantization=quantized.format_of(weight),
            )
        )


def linear_attribute_paths(model: nn.Module, site: Site) -> tuple[str, ...]:
    """The aliases of a tied weight through which its linear ops read it: the attributes of the modules those
    ops ran in (the capture's nn_module_stack), else the aliases not owned by an nn.Embedding. Empty when one
    attribute serves both kinds of use (then nothing can be untied by module attribute)."""
    owners = {a: a.rpartition(".")[0] for a in site.aliases}
    modules = set()
    for use in site.uses:
        stack = use.node.meta.get("nn_module_stack") or {}
        if stack:
            modules.add(list(stack.values())[-1][0])
    linear = tuple(a for a in site.aliases if owners[a] in modules)
    if not modules:
        linear = tuple(a for a in site.aliases if not isinstance(model.get_submodule(owners[a]), nn.Embedding))
    return linear if len(linear) < len(site.aliases) else ()


def _insert_one(use: Use, key: str):
    graph = use.node.graph
    args = (use.x, use.weight, use.node) + ((use.form,) if use.form != "right" else ())
    with graph.inserting_after(use.node):
        new = graph.call_module("adapters." + key, args)
    use.node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta["neat_site"] = key


def _check_capture(nm: NeatModule, model: nn.Module, args, kwargs, reference):
    with cap.train_mode(nm, False), torch.no_grad():
        out = nm(*args, **kwargs)
    result = compare(reference, out, rtol=CAPTURE_RTOL)
    ok, worst = result["ok"], result["max_rel"]
    if not ok:
        raise CaptureError(
            f"the captured graph of {type(model).__name__} does not reproduce the eager model on the example "
            f"inputs in eval mode (largest difference {worst:.3g} of the output's scale). Try capture='fx' or "
            f"dynamic=False, or pass check=False if the model is nondeterministic in eval mode."
        )
