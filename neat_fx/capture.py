"""Capture: a model and example inputs → one FX graph per mode ("train", "eval").

Route "export" (default): `torch.export.export(strict=False)` with every tensor dimension left to
`Dim.AUTO`, so batch and sequence stay dynamic where the model allows; then `ExportedProgram.module()`.
Route "fx": `torch.fx.symbolic_trace`, with `nn.Linear` calls lowered to `F.linear` on `get_attr`
weights so both routes present linear ops the same way to the matcher.

Each mode gets its own graph because `ExportedProgram.module()` fixes dropout / batch-norm behaviour
(and any `if self.training` branch) at capture time.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import CaptureError


@dataclass
class Capture:
    """The graph of one mode, and the module that owns the attributes it refers to."""

    mode: str
    graph: fx.Graph
    owner: nn.Module  # resolves get_attr / call_module targets that are not the model's own


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


def auto_dynamic_shapes(forward, args: tuple, kwargs: dict):
    """A torch.export `dynamic_shapes` spec leaving every dimension of every tensor input to `Dim.AUTO` (torch
    keeps dynamic what the model allows), shaped like the inputs: a tuple for positional-only inputs, else a
    dict keyed by `forward`'s argument names."""
    from torch.export import Dim

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())} or None
        return None

    def specs_of(tree):
        # None for non-tensor leaves, keeping the container structure torch.export expects.
        return pytree.tree_map(spec, tree, is_leaf=lambda x: x is None)

    if not kwargs:
        return tuple(specs_of(a) for a in args)
    if not args:
        return {k: specs_of(v) for k, v in kwargs.items()}
    # Mixed: name the positional arguments by the signature of forward.
    bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    return {k: specs_of(v) for k, v in bound.arguments.items()}


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


def refuse_non_finite(args: tuple, kwargs: dict):
    """Example inputs must be finite: the capture is checked by comparing outputs on them, and NaN compares
    unequal to itself (the error would blame the capture)."""
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for path, t in leaves:
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
            return model(*args, **kwargs)
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
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        return ep.module()


def _export(model: nn.Module, args: tuple, kwargs: dict, mode: str, dynamic) -> Capture:
    if dynamic is True:
        dynamic_shapes = auto_dynamic_shapes(model.forward, args, kwargs)
    elif dynamic is False or dynamic is None:
        dynamic_shapes = None
    else:
        dynamic_shapes = dynamic  # the caller's own torch.export dynamic_shapes
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy of the pytree spec warns about a deprecated API
        graph = copy.deepcopy(gm.graph)
    return Capture(mode, graph, gm)


class _LinearLowering(fx.Tracer):
    """symbolic_trace keeps nn.Linear as a leaf module call; we want the weight visible as get_attr."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) is nn.Linear:
            return False
        return super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module, mode: str) -> Capture:
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


def capture(model: nn.Module, args: tuple, kwargs: dict, *, method: str, modes, dynamic=True) -> dict[str, Capture]:
    captures = {}
    for mode in modes:
        if method == "export":
            captures[mode] = _export(model, args, kwargs, mode, dynamic)
        else:
            captures[mode] = _symbolic_trace(model, mode)
    return captures


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
