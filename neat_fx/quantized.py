"""Quantized bases: everything format-specific about weights held quantized (QLoRA-style), in one place.

A weight is *quantized* when the model holds it in a known quantized format: torchao's tensor subclasses
(`NF4Tensor` from `to_nf4` / `NF4WeightOnlyConfig`, `Int8Tensor` from `Int8WeightOnlyConfig`, the `Int4*Tensor`s
of `Int4WeightOnlyConfig`, what `quantize_` and transformers' `TorchAoConfig` produce) or bitsandbytes' parameters
(`Params4bit` of `Linear4bit`: NF4/FP4 with or without double quantization; `Int8Params` of `Linear8bitLt`: what
transformers' `BitsAndBytesConfig` produces).

The pass sees one form whatever the format: the captured graph reads such a weight as
`get_attr W → dequantize(W, dtype) → linear-like op`. `capture_view` gives torch.export a view of the model in which
every quantized weight is a plain stand-in of its logical shape and compute dtype (a zero broadcast: no memory) and
every bitsandbytes layer is a plain `F.linear` on it (bitsandbytes' own kernels and parameter classes do not trace);
`read_through` then points the graph at the real parameter and puts `dequantize` between it and its readers. So
matching, the adapter (H = σ(W0ᵀ A) from the dequantized W0), fold, generate and the adapter files all work on the
dequantized W0 of each site, computed where it is read — per site and per step, never the whole model at once — and
the model keeps its quantized parameters. (docs/design.md, "Quantized bases")

torchao and bitsandbytes are imported only when a model holds one of their tensors.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from .errors import ConfigError, MergeError

#: the formats this module knows, for error messages.
KNOWN_FORMATS = (
    "torchao NF4Tensor (to_nf4, NF4WeightOnlyConfig), Int8Tensor (Int8WeightOnlyConfig), Int4Tensor and the "
    "other torchao Int4*Tensor layouts (Int4WeightOnlyConfig, where the device has their kernels); bitsandbytes "
    "Params4bit (Linear4bit: NF4 / FP4, with or without double quantization) and Int8Params (Linear8bitLt)"
)

INSTALL_HINT = "pip install 'neat-fx[quantized]'"


def _torchao_format(t) -> str | None:
    name = type(t).__name__
    if name == "NF4Tensor":
        return "torchao.nf4"
    if name == "Int8Tensor":
        return "torchao.int8"
    if name.startswith("Int4") and name.endswith("Tensor"):
        return "torchao.int4"
    return None


def format_of(t) -> str | None:
    """The quantized format `t` is held in ("torchao.nf4", "torchao.int8", "torchao.int4", "bnb.nf4", "bnb.fp4",
    "bnb.int8"), or None for a tensor that is not quantized (plain, or a subclass this module does not know:
    `unknown_subclass`)."""
    cls = type(t)
    if cls in (torch.Tensor, nn.Parameter) or not isinstance(t, torch.Tensor):
        return None
    module = cls.__module__ or ""
    if module.startswith("torchao"):
        return _torchao_format(t)
    if module.startswith("bitsandbytes"):
        if cls.__name__ == "Params4bit":
            state = getattr(t, "quant_state", None)
            return f"bnb.{state.quant_type}" if state is not None else None
        if cls.__name__ == "Int8Params" and getattr(t, "SCB", None) is not None:
            return "bnb.int8"
    return None


def unknown_subclass(t) -> bool:
    """Whether `t` is a tensor subclass that holds its values in some other form (a quantization format this module
    does not know): not plain, not a known format, not torch's own (DTensor, FakeTensor, Buffer)."""
    cls = type(t)
    if not isinstance(t, torch.Tensor) or cls in (torch.Tensor, nn.Parameter) or format_of(t) is not None:
        return False
    module = cls.__module__ or ""
    return not (module == "torch" or module.startswith("torch."))  # torch's own: DTensor, FakeTensor, Buffer, …


def has_quantized(model: nn.Module) -> bool:
    return any(format_of(p) is not None for p in model.parameters())


def logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight `t` stands for (bitsandbytes packs 4-bit codes into an (n/2, 1) tensor)."""
    state = getattr(t, "quant_state", None)
    if format_of(t) in ("bnb.nf4", "bnb.fp4"):
        return tuple(state.shape)
    return tuple(t.shape)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype `dequantize` returns for `t`: the dtype of the weight it was quantized from."""
    fmt = format_of(t)
    if fmt in ("bnb.nf4", "bnb.fp4"):
        return t.quant_state.dtype
    if fmt == "bnb.int8":
        return torch.float16 if t.SCB.dtype == torch.float16 else torch.float32
    return t.dtype


def describe(t: torch.Tensor) -> dict | None:
    """What the adapter files record of a quantized base weight: the format and its block sizes (None: not
    quantized). Adapters are valid on one W0: a base quantized otherwise has another dequantized W0."""
    fmt = format_of(t)
    if fmt is None:
        return None
    out: dict = {"format": fmt}
    if fmt == "torchao.nf4":
        out.update(block_size=int(t.block_size), scaler_block_size=int(t.scaler_block_size))
    elif fmt == "torchao.int8":
        out.update(block_size=[int(b) for b in t.block_size])
    elif fmt in ("bnb.nf4", "bnb.fp4"):
        out.update(block_size=int(t.quant_state.blocksize), double_quant=bool(t.quant_state.nested))
    return out


def format_label(meta: dict | None) -> str:
    """'float (not quantized)' or 'bnb.nf4 (block 64, double quantization)' for messages."""
    if not meta:
        return "unquantized"
    extra = []
    if "block_size" in meta:
        extra.append(f"block {meta['block_size']}")
    if meta.get("double_quant"):
        extra.append("double quantization")
    return meta["format"] + (f" ({', '.join(extra)})" if extra else "")


def _require(library: str):
    try:
        return __import__(library)
    except ImportError as exc:
        raise ImportError(
            f"this model holds weights quantized with {library}, which is not installed here: {INSTALL_HINT}"
        ) from exc


def dequantize(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain tensor a quantized weight stands for, in `dtype` (default: `compute_dtype(t)`); a plain tensor is
    returned as it is. The node every captured graph reads a quantized weight through."""
    fmt = format_of(t)
    if fmt is None:
        return t if dtype is None or t.dtype == dtype else t.to(dtype)
    if fmt == "torchao.nf4":
        w = t.get_original_weight()
    elif fmt.startswith("torchao."):
        w = t.dequantize()
    elif fmt in ("bnb.nf4", "bnb.fp4"):
        bnb = _require("bitsandbytes")
        state = t.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ConfigError(
                "this bitsandbytes 4-bit weight was repacked in place for bitsandbytes' CPU kernel (an eval-mode "
                "forward of its Linear4bit under torch.no_grad on a CPU with AVX512-BF16) and can no longer be "
                "dequantized exactly; load the model again and transform it before running it that way"
            )
        w = bnb.functional.dequantize_4bit(t.data, state)
    elif fmt == "bnb.int8":
        w = t.data.float() * (t.SCB.float().unsqueeze(1) / 127.0)
        w = w.to(compute_dtype(t))
    else:  # pragma: no cover - format_of returns only the formats above
        raise AssertionError(fmt)
    w = w.as_subclass(torch.Tensor) if type(w) is not torch.Tensor else w
    w = w if dtype is None or w.dtype == dtype else w.to(dtype)
    recording = getattr(_RECOMPUTE, "table", None)
    if recording is not None:
        root = w._base if w._base is not None else w  # autograd sees views of the root (w.t(), w.mT)
        recording[id(root)] = (weakref.ref(root), t, dtype)
    return w


# -- training: dequantized weights are not kept for the backward ---------------------------------------------------
_RECOMPUTE = threading.local()


@dataclass(frozen=True)
class _Recomputed:
    """What autograd keeps of a (view of a) dequantized weight: the quantized weight and how to view it again."""

    source: torch.Tensor
    dtype: torch.dtype | None
    size: tuple
    stride: tuple
    offset: int
    nbytes: int  # of the storage viewed: the recomputation lays its values out the same way (deterministic code)


def _pack(x: torch.Tensor):
    table = getattr(_RECOMPUTE, "table", None)
    base = x._base if x._base is not None else x
    entry = table.get(id(base)) if table is not None else None
    if entry is None or entry[0]() is not base:  # identity through a weak reference: never a reused id
        return x
    nbytes = base.untyped_storage().nbytes()
    return _Recomputed(entry[1], entry[2], tuple(x.size()), tuple(x.stride()), x.storage_offset(), nbytes)


def _unpack(saved):
    if not isinstance(saved, _Recomputed):
        return saved
    table = getattr(_RECOMPUTE, "table", None)
    _RECOMPUTE.table = None  # the recomputation is not itself recorded
    try:
        w = dequantize(saved.source, saved.dtype)
    finally:
        _RECOMPUTE.table = table
    if w.untyped_storage().nbytes() != saved.nbytes:
        raise RuntimeError(
            f"neat_fx: a dequantized weight recomputed for the backward has {w.untyped_storage().nbytes()} bytes of "
            f"storage, {saved.nbytes} in the forward; please report this with the quantization format"
        )
    return w.as_strided(saved.size, saved.stride, saved.offset)  # an offset into the storage, like the saved view


@contextlib.contextmanager
def recompute_in_backward():
    """Within the block, autograd keeps a quantized weight (and how it was viewed) instead of its dequantized copy
    wherever an op saves one for the backward (a linear's input gradient, the adapter's W0ᵀ A), and dequantizes
    again when the backward needs it: a training step holds one site's dequantized weight at a time, as bitsandbytes'
    and torchao's own QLoRA linears do, never the whole model's."""
    outer = getattr(_RECOMPUTE, "table", None)
    _RECOMPUTE.table = {} if outer is None else outer
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECOMPUTE.table = outer


# -- capture -----------------------------------------------------------------------------------------------------
def is_bnb_layer(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (or a subclass: LinearNF4, LinearFP4)."""
    cls = type(module)
    return (cls.__module__ or "").startswith("bitsandbytes") and any(
        c.__name__ in ("Linear4bit", "Linear8bitLt") for c in cls.__mro__
    )


class DequantizedLinear(nn.Module):
    """A bitsandbytes Linear4bit / Linear8bitLt as it computes mathematically (QLoRA): `x·dequantize(W)ᵀ + b` in the
    layer's compute dtype, the output in the input's dtype. Views only (capture and the eager reference): bnb's own
    forward cannot be traced, and on CPU its eval/no_grad fast path repacks the weight in place."""

    def forward(self, x):
        w = self.weight
        dtype = getattr(self, "compute_dtype", None) or (compute_dtype(w) if format_of(w) else w.dtype)
        w = dequantize(w, dtype) if format_of(w) else (w if w.dtype == dtype else w.to(dtype))
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        y = F.linear(x if x.dtype == dtype else x.to(dtype), w, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def _view(model: nn.Module, stand_ins: bool) -> nn.Module:
    """A shallow copy of the module tree (tensors shared, the model untouched) whose bitsandbytes layers are
    `DequantizedLinear`s; with `stand_ins`, every quantized parameter is a plain zero broadcast of its logical shape
    and compute dtype (what torch.export traces instead of the subclass)."""
    views: dict[int, nn.Module] = {}

    def view_of(module: nn.Module) -> nn.Module:
        done = views.get(id(module))
        if done is not None:
            return done
        cls = DequantizedLinear if is_bnb_layer(module) else type(module)
        new = views[id(module)] = object.__new__(cls)
        state = dict(module.__dict__)
        params = dict(module._parameters)
        if stand_ins:
            for name, p in params.items():
                if p is not None and format_of(p) is not None:
                    shape, dtype = logical_shape(p), compute_dtype(p)
                    if cls is DequantizedLinear and getattr(module, "compute_dtype", None) is not None:
                        dtype = module.compute_dtype
                    zero = torch.zeros((), dtype=dtype, device=p.device).expand(shape)
                    params[name] = nn.Parameter(zero, requires_grad=False)
        state["_parameters"] = params
        state["_buffers"] = dict(module._buffers)
        state["_modules"] = {k: None if c is None else view_of(c) for k, c in module._modules.items()}
        new.__dict__.update(state)
        return new

    return view_of(model)


def capture_view(model: nn.Module) -> nn.Module:
    """What torch.export captures for `model`: itself when it holds no quantized weight, else the stand-in view."""
    if not has_quantized(model):
        return model
    return _view(model, stand_ins=True)


def eager_view(model: nn.Module) -> nn.Module:
    """What runs as the eager reference of `model`: itself, or — when it has bitsandbytes layers — a view computing
    them as `DequantizedLinear` on the real weights."""
    if not any(is_bnb_layer(m) for m in model.modules()):
        return model
    return _view(model, stand_ins=False)


def view_classes(model: nn.Module) -> dict[int, tuple[type, dict]]:
    """For `generate.adapted_view(classes=…)`: every bitsandbytes layer as a `DequantizedLinear` (its own forward
    cannot take the plain `W0 + ΔW` a view gives it, and on CPU its eval fast path repacks the weight in place)."""
    return {id(m): (DequantizedLinear, {}) for m in model.modules() if is_bnb_layer(m)}


def is_dequantize(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is dequantize


def parameter_node(node: fx.Node) -> fx.Node:
    """The get_attr of the parameter a weight node reads: `node` itself, or the parameter a `dequantize` reads."""
    return node.args[0] if is_dequantize(node) else node


def read_through(gm: fx.GraphModule, model: nn.Module) -> int:
    """After capturing `capture_view(model)`: make `gm` hold `model`'s real quantized parameters where the stand-ins
    were, and read each through one `dequantize(W, dtype)` node. Returns how many parameters it rewired."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        try:
            real = _resolve(model, node.target)
        except AttributeError:
            continue
        if format_of(real) is None:
            continue
        stand_in = _resolve(gm, node.target)
        owner, _, name = node.target.rpartition(".")
        (gm.get_submodule(owner) if owner else gm)._parameters[name] = real
        with gm.graph.inserting_after(node):
            deq = gm.graph.call_function(dequantize, (node, stand_in.dtype))
        node.replace_all_uses_with(deq, delete_user_cb=lambda user, deq=deq: user is not deq)
        deq.meta["val"] = node.meta.get("val")
        done += 1
    if done:
        gm.recompile()
    return done


def drop_unread(graph: fx.Graph) -> int:
    """Erase `dequantize` nodes nothing reads any more (fold replaced their readers by W0 + ΔW)."""
    gone = [n for n in graph.nodes if is_dequantize(n) and not n.users]
    for n in gone:
        graph.erase_node(n)
    return len(gone)


def _resolve(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def unknown_format_message(name: str, t: torch.Tensor) -> str:
    return (
        f"{name} is held as {type(t).__module__}.{type(t).__name__}, a quantized or packed format neat_fx does not "
        f"know, so its linear op cannot be adapted. Formats it knows: {KNOWN_FORMATS}. Quantize the base with one of "
        f"those (e.g. torchao's quantize_(model, NF4WeightOnlyConfig()) or transformers' "
        f"BitsAndBytesConfig(load_in_4bit=True)), or exclude the weight with exclude=[{name!r}]."
    )


# -- merging into a quantized base --------------------------------------------------------------------------------
def requantize(like: torch.Tensor, weight: torch.Tensor) -> nn.Parameter:
    """`weight` (plain, the merged W0 + ΔW) quantized in the format and block sizes of `like`."""
    fmt = format_of(like)
    device = weight.device
    if fmt == "torchao.nf4":
        from torchao.quantization import NF4Tensor

        w = weight.to(like.dtype)
        q = NF4Tensor.from_tensor(w, like.block_size, like.scaler_block_size)
    elif fmt == "torchao.int8":
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
        from torchao.quantization.quant_primitives import MappingType

        block = [int(b) for b in like.block_size]
        shape = list(like.shape)
        if block == shape:
            granularity = PerTensor()
        elif block[:-1] == [1] * (len(block) - 1) and block[-1] == shape[-1]:
            granularity = PerRow()
        else:
            granularity = PerGroup(block[-1])
        # torchao stores zeros for symmetric int8 too, and its weight-only kernel ignores the zero point
        asymmetric = like.zero_point is not None and bool(like.zero_point.any())
        mapping = MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC
        q = Int8Tensor.from_hp(
            weight.to(like.dtype),
            granularity,
            mapping_type=mapping,
            act_quant_kwargs=like.act_quant_kwargs,
            reduce_range=bool(like.reduce_range),
        )
    elif fmt in ("bnb.nf4", "bnb.fp4"):
        bnb = _require("bitsandbytes")
        state = like.quant_state
        p = bnb.nn.Params4bit(
            weight.to(state.dtype).cpu(),
            requires_grad=False,
            quant_type=state.quant_type,
            blocksize=state.blocksize,
            compress_statistics=bool(state.nested),
            quant_storage=getattr(like, "quant_storage", torch.uint8),
        )
        return p.to(device)  # bitsandbytes quantizes on the move to a device
    elif fmt == "bnb.int8":
        bnb = _require("bitsandbytes")
        p = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
        return p.to(device)
    else:
        raise MergeError(
            f"requantize=True cannot quantize a weight held as {type(like).__name__} ({fmt or 'not quantized'}) "
            f"again: neat_fx requantizes torchao.nf4, torchao.int8, bnb.nf4, bnb.fp4 and bnb.int8. Merge with "
            f"requantize=False (a plain weight)."
        )
    return nn.Parameter(q.to(device), requires_grad=False)


@dataclass(frozen=True)
class SiteMerge:
    """One site merged into a quantized base: `W = W0_deq + ΔW` (the merged weight) and, with requantize=True, the
    error of quantizing it again, `E = dequantize(requantize(W)) - W`."""

    name: str
    format: str  # the base weight's format
    dtype: str  # the merged weight's compute dtype
    requantized: bool
    update_max: float  # max |ΔW|: the adapter's update
    error_max: float = 0.0  # max |E| (0 when not requantized)
    error_rel: float = 0.0  # ‖E‖ / ‖W‖ (Frobenius)

    @property
    def error_to_update(self) -> float:
        """max |E| / max |ΔW|: near or above 1, requantizing erases much of what the adapter learned."""
        return self.error_max / self.update_max if self.update_max > 0 else math.inf if self.error_max else 0.0


@dataclass
class MergeReport:
    """What `merge_into` did to a quantized base, site by site, and — given example inputs — how far the merged
    model's outputs are from nm's (`output_max` absolute, `output_rel` relative to the output's scale)."""

    model: nn.Module
    requantize: bool
    sites: list[SiteMerge] = field(default_factory=list)
    output_max: float | None = None
    output_rel: float | None = None

    @property
    def error_max(self) -> float:
        return max((s.error_max for s in self.sites), default=0.0)

    @property
    def error_rel(self) -> float:
        return max((s.error_rel for s in self.sites), default=0.0)

    def __str__(self) -> str:
        what = "requantized in the base's format" if self.requantize else "plain weights (left quantization)"
        lines = [f"merged {len(self.sites)} sites: {what}"]
        for s in self.sites:
            line = f"  {s.name}: {s.format} → {s.format if s.requantized else s.dtype}, max|ΔW| {s.update_max:.3g}"
            if s.requantized:
                line += (
                    f", requantization error max {s.error_max:.3g} (rel {s.error_rel:.3g}, {s.error_to_update:.2f}×ΔW)"
                )
            lines.append(line)
        if self.output_max is not None:
            lines.append(f"outputs vs nm on the example: max {self.output_max:.3g} (rel {self.output_rel:.3g})")
        return "\n".join(lines)


def plain_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A bitsandbytes layer as a plain nn.Linear holding `weight` (its bias kept, cast to the weight's dtype)."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    out.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach(), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=module.bias.requires_grad)
    out.train(module.training)
    return out


def record_unquantized(model: nn.Module, modules: list[str]):
    """Tell a Hugging Face model loaded with `BitsAndBytesConfig` that `modules` are plain layers now, so
    `save_pretrained` → `from_pretrained` keeps them as nn.Linear (bitsandbytes' quantizer would make each a
    Linear4bit again, holding the float weight it cannot run). The skip list keeps transformers' default (the head)."""
    for config in {id(c): c for c in _quantization_configs(model)}.values():
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", "")
        method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum, or its string
        if "bitsandbytes" not in method:
            continue
        get = config.get if isinstance(config, dict) else lambda k, c=config: getattr(c, k, None)
        current = get("llm_int8_skip_modules")
        if current is None:
            from transformers.quantizers.base import get_keys_to_not_convert

            current = get_keys_to_not_convert(model)
        value = sorted(set(current) | set(modules))
        if isinstance(config, dict):
            config["llm_int8_skip_modules"] = value
        else:
            config.llm_int8_skip_modules = value


def _quantization_configs(model: nn.Module):
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None:
        yield config
    quantizer = getattr(model, "hf_quantizer", None)
    if getattr(quantizer, "quantization_config", None) is not None:
        yield quantizer.quantization_config
