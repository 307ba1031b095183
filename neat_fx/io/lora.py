"""NEAT adapters in the exact LoRA form, for every server that knows LoRA (PEFT, vLLM / TGI multi-LoRA, ONNX
Runtime adapters).

At inference a trained NEAT site is a rank-r update of its frozen weight: `H = σ(W0ᵀ A)` (through the r×r stack
when depth > 2) depends only on W0 and the adapter, so `ΔW = s·B Hᵀ` is LoRA with `lora_A = Hᵀ`, `lora_B = B`
and scaling `s` (`lora_alpha = s·r`). `save(nm, folder)` writes a PEFT LoRA checkpoint: `adapter_config.json`
(`peft_type: "LORA"`) and `adapter_model.safetensors`, `lora_A` computed in float32 from the base's W0. The file
is only valid on that exact base, so the safetensors header also carries our fingerprints of the base weights
(`neat_fx_base`, JSON; PEFT ignores header metadata); `check_base` compares them with a model.

Export only: H cannot be turned back into A, so `read` refuses a LoRA-form folder with a pointer to the NEAT
adapters it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..adapters import neat_hidden
from ..containers import NeatModule
from ..errors import AdapterMismatchError
from ..names import module_name
from .fingerprint import fingerprint, fingerprint_matches
from .peft import CONFIG, PREFIX, WEIGHTS, peft_name, refuse_experts, trained_modules
from .writing import write_swapped

#: safetensors header key holding {module name: fingerprint of its base weight} and the source.
BASE_KEY = "neat_fx_base"
#: the value of BASE_KEY's "source": tells a LoRA-form export of ours from any other LoRA checkpoint.
SOURCE = "neat_fx lora form"


def _lora_module(nm: NeatModule, site) -> tuple[str, bool] | str:
    """(PEFT module name, fan_in_fan_out) of a site PEFT's LoRA can wrap, else why not."""
    name = peft_name(site)
    try:
        mod = nm.model.get_submodule(module_name(name))
    except AttributeError:
        return f"{site.name} ({site.kinds}: no module owns it)"
    if not name.endswith(".weight"):
        return f"{site.name} ({site.kinds}: not a module's weight)"
    if isinstance(mod, nn.Linear) and site.layout == "out_in":
        return module_name(name), False
    if type(mod).__name__ == "Conv1D" and site.layout == "in_out":  # transformers' GPT-2 Conv1D
        return module_name(name), True
    return f"{site.name} ({site.kinds} in {type(mod).__name__})"


@torch.no_grad()
def save(nm: NeatModule, folder: Path):
    experts = [s.name for s in nm.site_infos if s.experts]
    if experts:
        raise AdapterMismatchError(refuse_experts("The LoRA form", experts))
    modules, unsupported = {}, []
    for site in nm.site_infos:
        found = _lora_module(nm, site)
        if isinstance(found, str):
            unsupported.append(found)
        else:
            modules[site.key] = found
    if unsupported:
        raise AdapterMismatchError(
            "PEFT's LoRA wraps nn.Linear and GPT-2's Conv1D modules only; these sites are not read through one (a "
            "functional F.linear, x @ W, an einsum): " + "; ".join(unsupported) + ". Transform with exclude= for "
            "them, or save with format='neat'."
        )
    tensors, base = {}, {}
    for site in nm.site_infos:
        ad, w0 = nm.adapters[site.key], nm.weight_of(site)
        h = neat_hidden(w0, ad.A, list(ad.encoders), list(ad.decoders), ad.activation, ad.layout, torch.float32)
        name, _ = modules[site.key]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = h.t().contiguous()  # (r, d_in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = ad.B.detach().float().contiguous()  # (d_out, r)
        base[name] = fingerprint(w0)
    to_save = trained_modules(nm, tensors)
    fan_in_fan_out = sorted({f for _, f in modules.values()})
    c = nm.neat_config

    def make_config(_sha):
        model_cfg = getattr(nm.model, "config", None)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
            "r": c.rank,
            "lora_alpha": c.scale * c.rank,  # PEFT's scaling is lora_alpha / r
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out == [True],  # mixed: PEFT sets it per module (with a warning)
            "target_modules": sorted(name for name, _ in modules.values()),
            "modules_to_save": to_save or None,
            "init_lora_weights": True,
            "inference_mode": True,
        }

    metadata = {BASE_KEY: json.dumps({"source": SOURCE, "activation": c.activation, "fingerprints": base})}
    write_swapped(folder, WEIGHTS, tensors, CONFIG, make_config, metadata)


def read_base(folder: Path) -> dict | None:
    """The base fingerprints a LoRA-form export of ours carries, or None for another LoRA checkpoint."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # a truncated or foreign file
        raise AdapterMismatchError(f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc})") from None
    if BASE_KEY not in meta:
        return None
    try:
        base = json.loads(meta[BASE_KEY])
    except json.JSONDecodeError:
        raise AdapterMismatchError(
            f"{path}: header field {BASE_KEY!r} is not JSON; export the LoRA form again"
        ) from None
    if not isinstance(base, dict) or base.get("source") != SOURCE or not isinstance(base.get("fingerprints"), dict):
        raise AdapterMismatchError(f"{path}: header field {BASE_KEY!r} is malformed; export the LoRA form again")
    return base


def check_base(folder: Path, model: nn.Module):
    """Raise AdapterMismatchError unless every base weight the LoRA-form export in `folder` was computed from
    matches `model`'s (H = σ(W0ᵀ A) is only valid on that W0)."""
    base = read_base(folder)
    if base is None:
        return  # a LoRA checkpoint of another origin: nothing to compare
    wrong = []
    for name, saved in base["fingerprints"].items():
        try:
            weight = model.get_parameter(name + ".weight")
        except AttributeError:
            wrong.append(f"{name} (not in {type(model).__name__})")
            continue
        if not fingerprint_matches(saved, weight):
            wrong.append(name)
    if wrong:
        shown = ", ".join(wrong[:5]) + (f", … ({len(wrong) - 5} more)" if len(wrong) > 5 else "")
        raise AdapterMismatchError(
            f"{folder} is a LoRA-form export computed from another base model: {shown} differ from the weights it "
            f"was computed on. Export it again from NEAT adapters on this base."
        )
