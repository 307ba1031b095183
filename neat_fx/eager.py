"""A NeatModule's adapters in the model's own Python code: what APIs that call the model in ways one captured
graph cannot serve (Hugging Face's Trainer and TRL's trainers: any keyword arguments, the backbone alone, the LM
head's weight read directly, generation) run on. (docs/design.md, "Eager adapters")

`eager_view(nm)` is a view of `nm.model` (`generate.adapted_view`: a shallow copy of the module tree sharing every
tensor, nothing of the model written) in which each module owning an adapted weight gets a subclass of its own
class:

* reading the weight attribute gives `W0 + ΔW` (differentiable; ΔW materialised from the adapter), so code that
  reads `module.weight` — an LM head projected by hand, `F.linear(x, self.proj.weight)` — sees the adapted weight;
* `nn.Linear` and GPT-2's `Conv1D` also get a forward that adds the adapter in its factorised form
  (`y + s·(x H) Bᵀ`, the same `NeatAdapter` call the captured graph makes), so the usual path never materialises ΔW;
* a parameter trained in full (`trainable=`) reads as nm's trained copy.

The adapters are nm's own parameters: training through the view trains nm. `adapters_disabled(nm)` turns them off
for the calls of this thread / task (a context variable, not a flag on a module): the view computes the base model
exactly — the reference a DPO/KTO/GRPO trainer needs, with no second copy of the base.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import quantized
from .containers import NeatModule, SiteInfo, adapters_active, adapters_disabled
from .errors import ConfigError
from .generate import adapted_view


def _own_tensor(module: nn.Module, attr: str) -> torch.Tensor:
    t = module._parameters.get(attr)
    return t if t is not None else module._buffers[attr]


class _SiteWeight:
    """`attr` of a module holds W0 of `site`: reads give W0 + ΔW while nm's adapters are on."""

    def __init__(self, nm: NeatModule, site: SiteInfo, attr: str):
        self.nm, self.site, self.attr = nm, site, attr
        self.adapter = nm.adapters[site.key]

    def base(self, module: nn.Module) -> torch.Tensor:
        """W0 as a plain tensor (a quantized base weight dequantized here, per call: neat_fx.quantized)."""
        # after another module merged into a shared weight, nm keeps its own W0 (NeatModule.follow_merges)
        own = self.nm.base_weights._buffers.get(self.site.key)
        w0 = own if own is not None else _own_tensor(module, self.attr)
        return quantized.dequantize(w0) if self.site.quantization else w0

    def value(self, module: nn.Module) -> torch.Tensor:
        w0 = self.base(module)
        if not adapters_active(self.nm):
            return w0
        return (w0.to(torch.float32) + self.adapter.delta_weight(w0)).to(w0.dtype)


class _TrainedCopy:
    """`attr` of a module is a parameter nm trains in full: reads give nm's copy (in the original's dtype)."""

    def __init__(self, nm: NeatModule, key: str, attr: str):
        self.nm, self.key, self.attr = nm, key, attr

    def value(self, module: nn.Module) -> torch.Tensor:
        original = _own_tensor(module, self.attr)
        if not adapters_active(self.nm):
            return original
        return self.nm.trainable[self.key].to(original.dtype)


def _reader(attr: str) -> property:
    def read(self):
        return self.__dict__["_neat_eager"][attr].value(self)

    return property(read, doc=f"{attr}: W0 + ΔW (or the trained copy) while the adapters are on")


def _linear_forward(self, input):
    site = self.__dict__["_neat_eager"]["weight"]
    w0 = site.base(self)
    y = F.linear(input, w0, self.bias)
    return site.adapter(input, w0, y) if adapters_active(site.nm) else y


def _dequantized_linear_forward(self, x):
    """A bitsandbytes layer as QLoRA computes it (quantized.DequantizedLinear), plus the adapter, in its compute
    dtype; the output in the input's dtype."""
    site = self.__dict__["_neat_eager"]["weight"]
    w0 = site.base(self)
    dtype = getattr(self, "compute_dtype", None) or w0.dtype
    w0 = w0.to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    xc = x.to(dtype)
    y = F.linear(xc, w0, bias)
    if adapters_active(site.nm):
        y = site.adapter(xc, w0, y)
    return y.to(x.dtype)


def _conv1d_forward(self, x):
    site = self.__dict__["_neat_eager"]["weight"]
    w0 = site.base(self)
    y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), w0).view(*x.shape[:-1], self.nf)
    return site.adapter(x, w0, y) if adapters_active(site.nm) else y


def _factorised_forward(cls: type):
    """The forward that adds the adapter factorised, for classes whose forward we know exactly."""
    if cls.forward is nn.Linear.forward:
        return _linear_forward
    if issubclass(cls, quantized.DequantizedLinear):
        return _dequantized_linear_forward
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers absent: no Conv1D modules either
        return None
    return _conv1d_forward if cls.forward is Conv1D.forward else None


_CLASSES: dict[tuple[type, tuple[str, ...], bool], type] = {}
_CLASSES_LOCK = threading.Lock()


def _eager_class(base: type, attrs: tuple[str, ...], factorised: bool) -> type:
    key = (base, attrs, factorised)
    with _CLASSES_LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            namespace = {a: _reader(a) for a in attrs}
            namespace["__module__"] = base.__module__
            if factorised:
                namespace["forward"] = _factorised_forward(base)
            cls = _CLASSES[key] = type(base.__name__, (base,), namespace)
            cls.__qualname__ = f"{base.__qualname__}[neat]"
        return cls


def eager_view(nm: NeatModule, *, training: bool | None = None) -> nn.Module:
    """`nm.model` computing `nm`'s function in its own Python code (see the module docstring). Shares every tensor
    with the model and nm; writes to neither. `training=None` keeps each module's flag."""
    if not isinstance(nm, NeatModule):
        raise ConfigError(f"eager_view takes a NeatModule (what neat_fx.transform returns), got {type(nm).__name__}")
    model = nm.model
    entries: dict[int, dict] = {}
    owners: dict[int, nn.Module] = {}

    def add(path: str, entry_of):
        owner_path, _, attr = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        if attr not in owner._parameters and attr not in owner._buffers:
            raise ConfigError(
                f"{path} is not a parameter or buffer of {type(owner).__name__}; the eager view needs the adapted "
                f"weight to be the module's own tensor"
            )
        owners[id(owner)] = owner
        entries.setdefault(id(owner), {})[attr] = entry_of(attr)

    for site in nm.site_infos:
        if site.shared_with_other_ops and not site.linear_paths:
            raise ConfigError(
                f"{site.name} is read as a linear weight and by other ops through the same attribute, so the model's "
                f"own code cannot be given W0 + ΔW for the linear uses only; transform with exclude={[site.name]!r}"
            )
        for path in site.linear_paths or site.aliases or (site.name,):
            add(path, lambda attr, site=site: _SiteWeight(nm, site, attr))
    for key, name in nm.trainable_names.items():
        add(name, lambda attr, key=key: _TrainedCopy(nm, key, attr))

    # bitsandbytes layers compute as DequantizedLinear: their own forward takes no plain W0 + ΔW, and on CPU its
    # eval fast path repacks the weight in place (neat_fx.quantized)
    classes = quantized.view_classes(model)
    for oid, attrs in entries.items():
        base = classes[oid][0] if oid in classes else type(owners[oid])
        site = attrs.get("weight")
        factorised = isinstance(site, _SiteWeight) and _factorised_forward(base) is not None
        classes[oid] = (_eager_class(base, tuple(sorted(attrs)), factorised), {"_neat_eager": attrs})
    return adapted_view(model, {}, classes=classes, own_hooks=True, training=training, refuse_offloaded=False)


def base_view(model: nn.Module, *, training: bool | None = False) -> nn.Module:
    """`model` as it is (a view sharing every tensor, with its own training flags and hook tables): a reference
    model that costs no copy of the weights, and whose patching by a trainer stays off the model."""
    classes = quantized.view_classes(model)
    return adapted_view(model, {}, classes=classes, own_hooks=True, training=training, refuse_offloaded=False)


def _run_base(nm: NeatModule, *args, **kwargs):
    """nm's forward inside `nm.disable_adapters()`: the model's own code on W0 (the eager view, adapters off)."""
    return eager_view(nm, training=nm.training)(*args, **kwargs)


NeatModule._run_base = staticmethod(_run_base)

__all__ = ["adapters_active", "adapters_disabled", "base_view", "eager_view"]
