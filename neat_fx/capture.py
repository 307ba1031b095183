"""Capture: a model and example inputs → one FX graph per mode ("train", "eval").

Route "export" (default): `torch.export.export(strict=False)`, then `ExportedProgram.module()`. With
`dynamic=True` the batch and sequence dimensions are left to `Dim.AUTO` (`default_dynamic_dims` says which) and
image geometry stays static; `dynamic="all"` leaves every dimension to `Dim.AUTO`.
Route "fx": `torch.fx.symbolic_trace`, with `nn.Linear` calls lowered to `F.linear` on `get_attr` weights so both
routes present linear ops the same way to the matcher.

Each mode needs its own graph because `ExportedProgram.module()` fixes dropout / batch-norm behaviour (and any
`if self.training` branch) at capture time. Capturing costs seconds, so the eval graph is derived from the train
graph when they differ only by those ops' flags (`derive_eval_graph`), and checked against the eager model in
eval mode on the example inputs; anything else in the train graph that depends on training (random draws outside
dropout, writes to the model's state) or a derived graph that does not reproduce the eager model gets the eval
graph captured on its own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import quantized
from .errors import CaptureError, ConfigError
from .numerics import compare

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """The graph of one mode, and the module that owns the attributes it refers to."""

    mode: str
    graph: fx.Graph
    owner: nn.Module  # resolves get_attr / call_module targets that are not the model's own
    derived: str | None = None  # eval graph derived from the train graph: what was flipped; None when captured


def split_example_inputs(example_inputs) -> tuple[tuple, dict]:
    """`example_inputs` is a tuple/list of positional arguments, a dict of keyword arguments,
    a (args, kwargs) pair given as a tuple whose second item is a dict, or a single tensor."""
    if example_inputs is None:
        raise CaptureError(
            "example_inputs is required: pass a tuple of positional arguments or a dict of keyword "
            "arguments that the model accepts, e.g. example_inputs=dict(input_ids=ids, attention_mask=mask)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict) or (hasattr(example_inputs, "keys") and hasattr(example_inputs, "items")):
        return (), dict(example_inputs.items())
    if isinstance(example_inputs, (tuple, list)):
        if (
            len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list))
            and isinstance(example_inputs[1], dict)
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


def sequence_lengths(tensors) -> set[int]:
    """The sequence lengths among the inputs: the size of dimension 1 of every tensor of rank 2 or 3 ((batch, length)
    ids, masks, labels, audio; (batch, length, features) embeddings), when 2 or more."""
    return {int(t.shape[1]) for t in tensors if t.dim() in (2, 3) and t.shape[1] >= 2}


def default_dynamic_dims(x: torch.Tensor, sequences: set[int] = frozenset()) -> list[int]:
    """The dimensions of input `x` that `dynamic=True` leaves to `Dim.AUTO` (the others are static):

    - dimension 0 of every tensor of rank ≥ 1 — the batch;
    - dimension 1 of every tensor of rank 2 or 3 — the sequence or time axis of (batch, length) token ids, masks,
      labels and raw audio, and of (batch, length, features) embeddings, hidden states and feature frames;
    - any later dimension whose size is one of those sequence lengths (`sequences`, from `sequence_lengths`) —
      e.g. the two sequence axes of a 4-D attention mask or bias (batch, 1 or heads, length, length).

    Everything else is static: the features of (batch, length, features), channels and height/width of images
    (batch, channels, height, width), the geometry of video frames — unless a size happens to equal a sequence
    length (then that dimension is left to `Dim.AUTO` too, which costs capture time, not correctness). A dimension
    left to `Dim.AUTO` that the model fixes, or whose example size is 0 or 1, is specialised by torch.export without
    error."""
    if x.dim() == 0:
        return []
    dims = [0]
    if x.dim() in (2, 3):
        dims.append(1)
    dims += [d for d in range(2, x.dim()) if d not in dims and int(x.shape[d]) in sequences]
    return dims


def bound_inputs(forward, args: tuple, kwargs: dict) -> dict | None:
    """The example inputs by `forward`'s parameter names, as the capture exports them (`named_forward`): a `*args`
    parameter holds a tuple, and the inputs a `**kwargs` parameter takes stand by their own names. None when
    `forward` has no signature to bind to (or the inputs do not fit it: running the model reports that better)."""
    if forward is None:
        return None
    try:
        bound = dict(inspect.signature(forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None
    var = _var_keyword(forward)
    return {**{k: v for k, v in bound.items() if k != var}, **bound.get(var, {})}


def _var_keyword(forward) -> str | None:
    """The name of `forward`'s `**kwargs` parameter, if it has one."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def auto_dynamic_shapes(forward, args: tuple, kwargs: dict, every_dim: bool = False):
    """A torch.export `dynamic_shapes` spec for the inputs: `Dim.AUTO` on the batch and sequence dimensions
    (`default_dynamic_dims`), or on every dimension with `every_dim=True`; torch keeps dynamic what the model
    allows. A dict keyed by the inputs' names (`bound_inputs`); without a signature, a tuple for positional-only
    inputs, else a dict keyed by the keyword names."""
    from torch.export import Dim

    sequences = sequence_lengths(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))

    def spec(x):
        if isinstance(x, torch.Tensor):
            dims = range(x.dim()) if every_dim else default_dynamic_dims(x, sequences)
            return {i: Dim.AUTO for i in dims} or None
        return None

    def specs_of(tree):
        # None for non-tensor leaves, keeping the container structure torch.export expects.
        return pytree.tree_map(spec, tree, is_leaf=lambda x: x is None)

    bound = bound_inputs(forward, args, kwargs)
    if bound is not None:
        return {k: specs_of(v) for k, v in bound.items()}
    if not kwargs:
        return tuple(specs_of(a) for a in args)
    return {k: specs_of(v) for k, v in kwargs.items()}


def _flatten_var_keyword(forward, spec: dict) -> dict:
    """A caller's dict spec with the entry of a `**kwargs` parameter (a dict) spread into the top level: the inputs
    are exported by their own names (`named_forward`)."""
    var = _var_keyword(forward)
    if var is None or not isinstance(spec.get(var), dict):
        return spec
    return {**{k: v for k, v in spec.items() if k != var}, **spec[var]}


def named_forward(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """`model`, or — when example inputs go to its forward's `**kwargs` — a shallow copy of it whose `forward` takes
    them as named keyword-only parameters and calls the model's own. torch.export mis-binds a dynamic_shapes spec
    under a `**kwargs` parameter (non-strict export; pytorch/pytorch#150022), and names are what the rest of the
    pipeline keys inputs by. The copy shares the model's parameters, buffers, submodules and hooks (the captured
    names are the model's); the model itself is not written to."""
    var = _var_keyword(model.forward)
    if var is None:
        return model
    signature = inspect.signature(model.forward)
    try:
        extra = signature.bind(*args, **kwargs).arguments.get(var)
    except TypeError:
        return model  # the inputs do not fit: running the model says so
    if not extra:
        return model
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]
    own = model.forward

    def forward(*a, **k):
        return own(*a, **k)

    forward.__signature__ = signature.replace(parameters=params)
    view = copy.copy(model)
    view.forward = forward
    return view


def dynamic_shapes_for(forward, args: tuple, kwargs: dict, dynamic):
    """torch.export's `dynamic_shapes` for transform's `dynamic=`: True (batch and sequence, the default),
    "all" (every dimension), False / None (static), or the caller's own spec (a dict, tuple or list; a dict may
    give the inputs of a `**kwargs` parameter at the top level or in a dict under its name)."""
    if dynamic is True:
        return auto_dynamic_shapes(forward, args, kwargs)
    if isinstance(dynamic, str) and dynamic == "all":
        return auto_dynamic_shapes(forward, args, kwargs, every_dim=True)
    if dynamic is False or dynamic is None:
        return None
    if isinstance(dynamic, dict):
        return _flatten_var_keyword(forward, dynamic)
    if isinstance(dynamic, (tuple, list)):
        return dynamic
    raise ConfigError(
        f"dynamic must be True (batch and sequence dimensions dynamic), 'all' (every dimension), False (static) or "
        f"a torch.export dynamic_shapes spec (dict or tuple), got {dynamic!r}"
    )


@contextlib.contextmanager
def train_mode(module: nn.Module, training: bool):
    """Run the block with `module` in train (True) or eval (False) mode, restoring its mode after."""
    was = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was)


def first_lines(exc: BaseException, n: int = 3) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n    ".join(lines[:n])


def _model_files(model: nn.Module | None) -> set[str]:
    """The source files of the model's own classes (its modules' types): where its forward code lives."""
    files = set()
    for m in model.modules() if model is not None else ():
        try:
            files.add(os.path.realpath(inspect.getsourcefile(type(m)) or ""))
        except TypeError:  # a built-in class
            continue
    return files


def user_frame(exc: BaseException, model: nn.Module | None = None) -> str:
    """Where capture failed, as the user would look for it: the innermost frame in the model's own code (the
    files defining its modules' classes), else the innermost frame outside torch, numpy and neat_fx."""
    import traceback

    libraries = [
        os.path.dirname(torch.__file__),
        os.path.dirname(os.path.dirname(__file__)),
        "site-packages/numpy",
        "site-packages/torch",
    ]
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    own = _model_files(model)
    in_model = [f for f in frames if os.path.realpath(f.filename) in own]
    outside = [f for f in frames if not any(lib in f.filename for lib in libraries)]
    found = (in_model or outside or [None])[-1]
    if found is None:
        return ""
    return f"\n    at {found.filename}:{found.lineno} in {found.name}: {(found.line or '').strip()}"


#: options of Hugging Face configs that switch on train-time stochastic code (masking, layer dropping) which
#: torch.export cannot trace; capturing with them at 0 (or only the eval graph) avoids it.
TRAIN_TIME_OPTIONS = (
    "mask_time_prob",
    "mask_feature_prob",
    "layerdrop",
    "encoder_layerdrop",
    "decoder_layerdrop",
    "drop_path_rate",
    "stochastic_depth_prob",
)


def _export_fixes(model: nn.Module, exc: BaseException, mode: str, eval_captures: bool | None) -> str:
    """The fixes worth trying for this failure, most specific first."""
    text = f"{type(exc).__name__}: {exc}"
    fixes = []
    if mode == "train" and eval_captures:
        config = getattr(model, "config", None)
        on = [f"{k}={getattr(config, k)}" for k in TRAIN_TIME_OPTIONS if getattr(config, k, 0)]
        switch = (
            f"set {', '.join(k.split('=')[0] + '=0' for k in on)} in the model's config (now {', '.join(on)})"
            if on
            else "switch the train-only feature off in the model's code or config"
        )
        fixes.append(
            f"the eval graph captures fine: the failing code runs only in training. Either {switch} and "
            f"transform again, or capture the eval graph only with modes=('eval',) (no dropout in training)"
        )
    if "use_cache" in text or "cache_utils" in text or re.search(r"[A-Za-z]Cache\b", text):
        fixes.append(
            "Hugging Face decoders are captured without a KV cache: pass use_cache=False in the example inputs or "
            "set model.config.use_cache = False (neat_fx.generate brings the cache back for generation)"
        )
    if any(s in text for s in ("Constraints violated", "ConstraintViolation", "specialized", "Dim.")):
        fixes.append(
            "a dimension the model fixes was left dynamic: pass dynamic=False, or a torch.export "
            "dynamic_shapes spec that leaves only the axes that vary (e.g. the batch)"
        )
    config = getattr(model, "config", None)
    experts = any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    if experts and getattr(config, "_experts_implementation", None) in (None, "eager"):
        fixes.append(
            'the routed experts run the "eager" implementation, a Python loop over the experts a batch reaches, '
            'which torch.export cannot capture: build the model with experts_implementation="batched_mm" (or '
            '"grouped_mm"), e.g. from_pretrained(..., experts_implementation="batched_mm")'
        )
    if any(s in text for s in ("data-dependent", "DataDependent", "GuardOnDataDependent", "numpy")):
        fixes.append(
            "the model branches on tensor values or converts tensors to numpy at the line above: make that "
            "code traceable (torch.cond, or a tensor expression) or turn the feature off"
        )
    if not fixes:
        fixes.append(
            "make the failing op traceable (data-dependent Python control flow and unregistered output "
            "types are the usual causes); capture='fx' (torch.fx.symbolic_trace) serves simple modules"
        )
    return "Fixes: " + "; or ".join(fixes) + "."


def leaves_with_path(tree) -> list[tuple[tuple, Any]]:
    """`pytree.tree_flatten_with_path(tree)[0]` — each leaf with its key path — also for nodes registered without
    key paths (`register_pytree_node` without `flatten_with_keys_fn`, as diffusers registers its output classes),
    where torch raises: their children are keyed by dataclass field when the counts agree, else by position."""

    def walk(node, path):
        children, spec = pytree.tree_flatten(node, is_leaf=lambda x: x is not node)  # one level down
        if spec.is_leaf():
            return [(path, node)]
        try:
            keys = [p[0] for p, _ in pytree.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]]
        except ValueError:  # no flatten_with_keys_fn for this node
            fields = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
            keys = (
                [pytree.GetAttrKey(f) for f in fields]
                if len(fields) == len(children)
                else [pytree.SequenceKey(i) for i in range(len(children))]
            )
        return [leaf for key, child in zip(keys, children) for leaf in walk(child, (*path, key))]

    return walk(tree, ())


def refuse_non_finite(args: tuple, kwargs: dict):
    """Example inputs must be finite: the capture is checked by comparing outputs on them, and NaN compares
    unequal to itself (the error would blame the capture)."""
    for path, t in leaves_with_path((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            first, rest = path[1], pytree.keystr(path[2:])
            name = f"positional argument {first.idx}{rest}" if path[0].idx == 0 else f"{first.key!r}{rest}"
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise CaptureError(
                f"example input {name} holds {nan} NaN and {inf} infinite values of {t.numel()}; the capture is "
                f"checked by running the model on the example inputs, so they must be finite. Pass example inputs "
                f"with real values (a batch of your data)."
            )


def check_runs_eagerly(model: nn.Module, args: tuple, kwargs: dict):
    """Run the model once on the example inputs (eval, no grad) so a bad input is reported as such,
    not as an obscure tracing error. Returns the output, the reference for the capture check."""
    try:
        with train_mode(model, False), torch.no_grad():
            return quantized.eager_view(model)(*args, **kwargs)  # bitsandbytes layers as they compute
    except Exception as exc:
        raise CaptureError(
            f"{type(model).__name__} does not run on the example inputs, so it cannot be captured:\n"
            f"    {first_lines(exc)}\n"
            f"Pass example_inputs the model accepts: a tuple of positional arguments or a dict of keyword "
            f"arguments (here: args of types {[type(a).__name__ for a in args]}, kwargs {sorted(kwargs)})."
        ) from exc


def _export_module(model: nn.Module, args: tuple, kwargs: dict, mode: str, dynamic_shapes) -> fx.GraphModule:
    with train_mode(model, mode == "train"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = named_forward(model, args, kwargs)  # after train_mode: a copy takes the model's mode
        # quantized weights: exported as plain stand-ins, then read from the real ones through `dequantize`
        view = quantized.capture_view(target)
        ep = torch.export.export(view, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        gm = ep.module()
        if view is not target:
            quantized.read_through(gm, model)
        return gm


def _export(model: nn.Module, args: tuple, kwargs: dict, mode: str, dynamic_shapes) -> Capture:
    try:
        gm = _export_module(model, args, kwargs, mode, dynamic_shapes)
    except Exception as exc:
        eval_captures = None
        if mode == "train":  # worth one more capture on the error path: it tells which fix applies
            try:
                _export_module(model, args, kwargs, "eval", dynamic_shapes)
                eval_captures = True
            except Exception:
                eval_captures = False
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} in {mode} mode:\n    {first_lines(exc)}"
            f"{user_frame(exc, model)}\n{_export_fixes(model, exc, mode, eval_captures)}"
        ) from exc
    # The graph itself, not a copy (copying costs ~0.1 s on a 24-layer model): `gm` is never run again, it only holds
    # the attributes the graph refers to; un-owned, the graph takes nodes that call the container's modules.
    graph = gm.graph
    graph.owning_module = None
    return Capture(mode, graph, gm)


class _LinearLowering(fx.Tracer):
    """symbolic_trace keeps nn.Linear as a leaf module call; we want the weight visible as get_attr."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) is nn.Linear:
            return False
        return super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module, mode: str) -> Capture:
    if quantized.has_quantized(model):
        raise CaptureError(
            f"capture='fx' cannot read {type(model).__name__}'s quantized weights (torch.fx.symbolic_trace does not "
            f"see through tensor subclasses); use capture='export' (the default)"
        )
    try:
        with train_mode(model, mode == "train"):
            graph = _LinearLowering().trace(model)
    except Exception as exc:
        raise CaptureError(
            f"torch.fx.symbolic_trace could not capture {type(model).__name__} in {mode} mode:\n"
            f"    {first_lines(exc)}{user_frame(exc, model)}\n"
            f"Use capture='export' (the default), which handles Python control flow on shapes and Hugging "
            f"Face models."
        ) from exc
    return Capture(mode, graph, model)


def capture(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    method: str,
    modes,
    dynamic=True,
    reference=None,
    rtol: float = 1e-4,
) -> dict[str, Capture]:
    """One graph per mode in `modes`. With method "export" and both modes, the train graph is captured and the eval
    graph derived from it where it can be (`derive_eval_graph`) and reproduces, within `rtol`, `reference` — the
    eager model's eval-mode output on the example inputs (computed here when not given); else captured too."""
    if method != "export":
        return {mode: _symbolic_trace(model, mode) for mode in modes}
    dynamic_shapes = dynamic_shapes_for(model.forward, args, kwargs, dynamic)
    if "train" in modes and "eval" in modes:
        train = _export(model, args, kwargs, "train", dynamic_shapes)
        derived = _derived_eval(train, model, args, kwargs, reference, rtol)
        captures = {"train": train, "eval": derived or _export(model, args, kwargs, "eval", dynamic_shapes)}
    else:
        captures = {mode: _export(model, args, kwargs, mode, dynamic_shapes) for mode in modes}
    return {mode: captures[mode] for mode in modes}


# ---------------------------------------------------------------- the eval graph from the train graph

#: ops that take their training behaviour as an argument: schema name → (argument, its value in eval mode).
EVAL_ARGUMENTS = {
    **{
        f"aten::{op}{inplace}": ("train", False)
        for op in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
        for inplace in ("", "_")
    },
    "aten::native_dropout": ("train", False),
    "aten::rrelu": ("training", False),
    "aten::rrelu_": ("training", False),
    "aten::scaled_dot_product_attention": ("dropout_p", 0.0),
}
#: normalisations that use batch statistics in training and their running statistics (when tracked) in eval.
RUNNING_STATS = {"aten::batch_norm": "training", "aten::instance_norm": "use_input_stats"}
#: ops a drop-path / stochastic-depth mask is computed with (HF's drop_path, timm's, torchvision's).
_MASK_OPS = frozenset(
    f"aten::{op}"
    for op in (
        "rand",
        "rand_like",
        "new_zeros",
        "new_ones",
        "zeros_like",
        "ones_like",
        "bernoulli",
        "bernoulli_",
        "empty",
        "new_empty",
        "empty_like",
        "add",
        "add_",
        "floor",
        "floor_",
        "div",
        "div_",
        "mul",
        "mul_",
        "to",
        "_to_copy",
    )
)

#: mask ops whose tensor argument gives only the dtype, device (and shape) of the new tensor.
_LIKE_OPS = frozenset(
    f"aten::{op}" for op in ("new_empty", "new_zeros", "new_ones", "empty_like", "rand_like", "zeros_like", "ones_like")
)


def _schema_name(node: fx.Node) -> str | None:
    target = node.target
    return target._schema.name if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) else None


def _argument(node: fx.Node, name: str):
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args) and not a.kwarg_only:
                return node.args[i]
            return node.kwargs.get(name, a.default_value)
    raise KeyError(name)


def _set_argument(node: fx.Node, name: str, value):
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if i < len(node.args) and not a.kwarg_only:
                node.args = node.args[:i] + (value,) + node.args[i + 1 :]
            else:
                node.kwargs = {**node.kwargs, name: value}
            return
    raise KeyError(name)


def _is_random(node: fx.Node) -> bool:
    return _schema_name(node) is not None and torch.Tag.nondeterministic_seeded in node.target.tags


def _tensor_node(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _mask_chain(node: fx.Node) -> set[fx.Node] | None:
    """The nodes computing `node` when it is a random mask: random draws, fresh tensors and arithmetic on them
    with numbers and sizes only (no tensor of the model or of the inputs); else None."""
    chain, todo, random = set(), [node], False
    while todo:
        n = todo.pop()
        if n in chain:
            continue
        if _schema_name(n) not in _MASK_OPS:
            return None
        chain.add(n)
        random = random or _is_random(n)
        if _schema_name(n) not in _LIKE_OPS:  # x.new_empty(shape): x gives the dtype and device only
            todo += [a for a in pytree.tree_leaves((n.args, n.kwargs)) if _tensor_node(a)]
    if not random or any(u not in chain for n in chain if n is not node for u in n.users):
        return None
    return chain


def _drop_paths(graph: fx.Graph) -> int:
    """Rewrite every drop path (stochastic depth) — `x * mask` or `x.div(keep) * mask`, the mask drawn at random —
    to `x`, what it computes in eval mode. Returns how many."""
    count = 0
    for node in list(graph.nodes):
        if _schema_name(node) != "aten::mul" or len(node.args) != 2 or not all(map(_tensor_node, node.args)):
            continue
        for x, mask in (node.args, node.args[::-1]):
            chain = _mask_chain(mask) if len(mask.users) == 1 else None
            if chain is None or _mask_chain(x) is not None:
                continue
            kept = x
            if _schema_name(x) == "aten::div" and isinstance(x.args[1], (int, float)) and _tensor_node(x.args[0]):
                kept = x.args[0]  # HF's drop_path divides the kept rows by keep_prob
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            for n in sorted(chain | ({x} if kept is not x else set()), key=_position(graph), reverse=True):
                if not n.users:
                    graph.erase_node(n)
            count += 1
            break
    return count


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _base(node: fx.Node) -> fx.Node:
    """The tensor `node` is a view of (itself if it is none)."""
    while _schema_name(node) is not None:
        returns = node.target._schema.returns
        alias = returns[0].alias_info if returns else None
        if alias is None or alias.is_write or not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _written(node: fx.Node) -> list[fx.Node]:
    """The tensors an in-place / out= op writes."""
    out = []
    for i, a in enumerate(node.target._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = node.args[i] if i < len(node.args) and not a.kwarg_only else node.kwargs.get(a.name)
            out += [v for v in pytree.tree_leaves(value) if isinstance(v, fx.Node)]
    return out


def derive_eval_graph(train: fx.Graph, owner: nn.Module) -> tuple[fx.Graph | None, str]:
    """The eval graph of a captured train graph, when they differ only by what can be flipped: dropout (and its
    feature / alpha variants, sdpa's dropout_p, RReLU) set to eval, batch and instance norm on their running
    statistics (their `num_batches_tracked` counter no longer counted), drop paths removed. Returns (graph, what
    was changed), or (None, why not) when the train graph holds other training-dependent work: random draws
    outside those ops, writes to the model's state, or any of it inside a subgraph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = copy.deepcopy(train)
    done: dict[str, int] = {}

    def note(what):
        done[what] = done.get(what, 0) + 1

    for _ in range(_drop_paths(graph)):
        note("drop path")
    for node in list(graph.nodes):
        module = _resolve_or_none(owner, node.target) if node.op == "get_attr" else None
        if isinstance(module, fx.GraphModule):  # a subgraph (torch.cond branch, set_grad_enabled region, …)
            sub, why = derive_eval_graph(module.graph, module)
            if sub is None or why:
                return None, f"training-dependent ops inside the subgraph {node.target} ({why or 'none flippable'})"
            continue
        name = _schema_name(node)
        if name is None:
            continue
        if name in EVAL_ARGUMENTS:
            arg, value = EVAL_ARGUMENTS[name]
            if _argument(node, arg) != value:
                _set_argument(node, arg, value)
                note(name.removeprefix("aten::"))
            continue
        if name in RUNNING_STATS:
            mean, var = _argument(node, "running_mean"), _argument(node, "running_var")
            if mean is not None and var is not None and _argument(node, RUNNING_STATS[name]):
                _set_argument(node, RUNNING_STATS[name], False)
                note(name.removeprefix("aten::"))
            continue
        if node.target._schema.is_mutable:
            state = [_base(w) for w in _written(node)]
            state = [w.target for w in state if w.op == "get_attr"]
            if state and all(t.rsplit(".", 1)[-1] == "num_batches_tracked" for t in state) and not node.users:
                graph.erase_node(node)  # the batch-norm step counter counts training steps only
                continue
            if state:
                return None, f"{node.target} writes the model's state {state[0]}"
        if _is_random(node):
            return None, f"{node.target} draws random numbers outside dropout"
    graph.lint()
    return graph, ", ".join(f"{k} ×{v}" for k, v in done.items())


def _resolve_or_none(root, target: str):
    try:
        return resolve_attr(root, target)
    except AttributeError:
        return None


def _derived_eval(train: Capture, model: nn.Module, args: tuple, kwargs: dict, reference, rtol: float):
    """The eval Capture derived from `train` (sharing its owner) if derivable and equal to the eager model in eval
    mode on the example inputs within `rtol`; else None (the caller captures the eval graph). A model on the meta
    device has no values to compare: the structural rule alone decides."""
    graph, what = derive_eval_graph(train.graph, train.owner)
    if graph is None:
        log.debug("capture: eval graph captured on its own: %s", what)
        return None
    derived = Capture("eval", graph, train.owner, derived=what or "nothing to flip")
    if any(p.is_meta for p in model.parameters()):
        return derived
    try:
        if reference is None:
            with train_mode(model, False), torch.no_grad():
                reference = quantized.eager_view(model)(*args, **kwargs)
        gm = fx.GraphModule(train.owner, graph)  # run once here; the graph is installed in its own module later
        try:
            with torch.no_grad():
                out = gm(*args, **kwargs)
        finally:
            graph.owning_module = None
        result = compare(reference, out, rtol=rtol)
    except Exception as exc:
        log.debug("capture: eval graph captured on its own: the derived one fails: %s", first_lines(exc, 1))
        return None
    if not result["ok"]:
        log.debug("capture: eval graph captured on its own: the derived one differs by %.3g", result["max_rel"])
        return None
    return derived


def resolve_attr(root: Any, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def has_attr_path(root: Any, target: str) -> bool:
    try:
        resolve_attr(root, target)
        return True
    except AttributeError:
        return False
