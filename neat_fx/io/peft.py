"""Hugging Face PEFT's PEANuT checkpoints (`adapter_config.json` + `adapter_model.safetensors`): the same
method (NEAT), read and written so users' existing checkpoints work both ways. PEFT records no base
fingerprints or layouts, so loads of this format check shapes only."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ..activations import from_peft, peft_names, to_peft
from ..config import NeatConfig
from ..containers import NeatModule
from ..errors import AdapterMismatchError, ConfigError
from ..names import module_name
from .loaded import LoadedAdapters, check_site_tensors, finite_number, get_field, mismatch
from .writing import load_tensors, read_json, write_swapped

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save(nm: NeatModule, folder: Path):
    act = nm.neat_config.activation
    if to_peft(act) is None:
        raise AdapterMismatchError(
            f"PEFT's PEANuT has no {act!r} activation (it takes transformers' ACT2FN names); save with format='neat'"
        )
    experts = [s.name for s in nm.site_infos if s.experts]
    if experts:
        raise AdapterMismatchError(refuse_experts("PEFT's PEANuT", experts))
    unsupported = []
    for s in nm.site_infos:
        try:
            mod = nm.model.get_submodule(module_name(peft_name(s)))
        except AttributeError:
            mod = None
        if not peft_name(s).endswith(".weight") or not isinstance(mod, nn.Linear) or s.layout != "out_in":
            unsupported.append(f"{s.name} ({s.kinds}, {type(mod).__name__ if mod is not None else 'no module'})")
    if unsupported:
        raise AdapterMismatchError(
            "PEFT's PEANuT supports nn.Linear modules only; these sites are not: "
            + "; ".join(unsupported)
            + ". Save with format='neat', or transform with exclude= for them."
        )
    tensors = {}
    for s in nm.site_infos:
        ad = nm.adapters[s.key]
        stem = PREFIX + module_name(peft_name(s))
        tensors[f"{stem}.peanut_A.weight"] = ad.A.t()
        tensors[f"{stem}.peanut_B.weight"] = ad.B
        for i, e in enumerate(ad.encoders):
            tensors[f"{stem}.peanut_encoders.{i}.weight"] = e
        for i, d in enumerate(ad.decoders):
            tensors[f"{stem}.peanut_decoders.{i}.weight"] = d
    modules_to_save = trained_modules(nm, tensors)

    def make_config(_sha):
        model_cfg = getattr(nm.model, "config", None)
        return {
            "peft_type": "PEANUT",
            "task_type": None,
            "base_model_name_or_path": getattr(model_cfg, "_name_or_path", None) or None,
            "r": nm.neat_config.rank,
            "depth": nm.neat_config.hidden_layers,
            "act_fn": to_peft(act),
            "scaling": nm.neat_config.scale,
            "target_modules": sorted(module_name(peft_name(s)) for s in nm.site_infos),
            "exclude_modules": None,
            "modules_to_save": sorted(modules_to_save) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "init_weights": True,
            "inference_mode": True,
            "revision": None,
            "auto_mapping": None,
        }

    write_swapped(folder, WEIGHTS, tensors, CONFIG, make_config)


def refuse_experts(what: str, names: list[str]) -> str:
    """The message refusing to write adapters of routed-expert stacks in a PEFT format."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = f"peft {version('peft')}"
    except PackageNotFoundError:
        installed = "peft not installed"
    shown = ", ".join(names[:6]) + (f", … ({len(names) - 6} more)" if len(names) > 6 else "")
    return (
        f"{what} cannot hold adapters of routed-expert stacks (3-D parameters): {shown}. PEFT adapts nn.Parameters "
        f"only through LoRA's target_parameters ({installed}; PEANuT has none), whose checkpoint keys depend on how "
        f"PEFT nests its wrappers. Save with format='neat', merge (neat_fx.merge_into) and save the model, or "
        f"transform with exclude= for them."
    )


def trained_modules(nm: NeatModule, tensors: dict) -> list[str]:
    """PEFT's `modules_to_save` for nm's parameters trained in full (whole modules only), their tensors added to
    `tensors` under PEFT's names."""
    modules = set()
    for key, name in nm.trainable_names.items():
        tensors[PREFIX + name] = nm.trainable[key]
        modules.add(name.rsplit(".", 1)[0] if "." in name else name)
    for mod_name in sorted(modules):
        params = {f"{mod_name}.{n}" for n, _ in nm.model.get_submodule(mod_name).named_parameters()}
        missing = sorted(params - set(nm.trainable_names.values()))
        if missing:
            raise AdapterMismatchError(
                f"PEFT saves whole modules (modules_to_save); {mod_name} has parameters not trained in full: "
                f"{', '.join(missing)}. Add them to trainable= or save with format='neat'."
            )
    return sorted(modules)


def peft_name(site) -> str:
    """The name PEFT knows a site by: its nn.Linear's weight (a head tied to an embedding: the head's)."""
    return site.linear_paths[0] if site.shared_with_other_ops and site.linear_paths else site.name


def read(folder: Path) -> LoadedAdapters:
    cpath = folder / CONFIG
    meta = read_json(cpath, "a PEFT adapter config")
    if meta.get("peft_type") == "LORA":
        raise AdapterMismatchError(
            f"{cpath} is a LoRA checkpoint (peft_type 'LORA'). If it is a LoRA-form export of NEAT adapters, it "
            f"cannot be loaded back as NEAT adapters (H = σ(W0ᵀ A) cannot be turned back into A): load the neat or "
            f"peft folder it was exported from; serve it with PEFT's LoRA or any LoRA server"
        )
    if meta.get("peft_type") != "PEANUT":
        raise AdapterMismatchError(
            f"{cpath} has peft_type {meta.get('peft_type')!r}; neat_fx reads PEFT 'PEANUT' checkpoints only"
        )
    act_fn = get_field(meta, "act_fn", str, cpath, f"a PEFT activation name ({peft_names()})", default="relu")
    act = from_peft(act_fn)
    if act is None:
        raise AdapterMismatchError(
            f"{cpath}: PEFT activation {act_fn!r} (field 'act_fn') has no neat_fx equivalent; supported: {peft_names()}"
        )
    rank = get_field(meta, "r", int, cpath, "the rank, a positive integer")
    depth = get_field(meta, "depth", int, cpath, "the number of r×r encoder layers, an integer ≥ 0", default=0)
    if rank < 1:
        raise mismatch(cpath, "field 'r'", f"is {rank}", "a positive integer")
    if depth < 0:
        raise mismatch(cpath, "field 'depth'", f"is {depth}", "an integer ≥ 0")
    scale = finite_number(meta, "scaling", cpath, default=1.0)
    wfile = folder / WEIGHTS
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} is missing (neat_fx reads safetensors checkpoints only, never .bin pickles)")
    tensors = load_tensors(wfile)
    sites, trainable, keys = {}, {}, {}
    rx = re.compile(r"^(?:base_model\.model\.)?(.*)\.peanut_(A|B|encoders|decoders)(?:\.(\d+))?\.weight$")
    for k, v in tensors.items():
        m = rx.match(k)
        if m is None:
            name = k[len(PREFIX) :] if k.startswith(PREFIX) else k
            if not v.dtype.is_floating_point:
                raise AdapterMismatchError(f"{wfile}: tensor {k} has dtype {v.dtype}; expected a floating-point dtype")
            trainable[name] = v
            continue
        site_name = m.group(1) + ".weight"
        site = sites.setdefault(site_name, {"encoders": {}, "decoders": {}})
        kd = keys.setdefault(site_name, {})
        part, idx = m.group(2), m.group(3)
        if part in ("A", "B"):
            if v.dim() != 2:
                raise AdapterMismatchError(
                    f"{wfile}: tensor {k} has shape {tuple(v.shape)}; expected a matrix "
                    f"({'(r, d_out)' if part == 'A' else '(d_out, r)'} for r={rank})"
                )
            site[part] = v.t() if part == "A" else v
            kd[part] = k
        elif idx is None:
            raise AdapterMismatchError(f"{wfile}: tensor {k} has no layer index; expected peanut_{part}.<i>.weight")
        else:
            site[part][int(idx)] = v
            kd[(part, int(idx))] = k
    for name, s in sites.items():
        if "A" not in s or "B" not in s:
            raise AdapterMismatchError(f"{wfile}: site {name} lacks peanut_A or peanut_B")
        for part in ("encoders", "decoders"):
            if sorted(s[part]) != list(range(depth)):
                raise AdapterMismatchError(
                    f"{wfile}: site {name} has {part} {sorted(s[part])}, depth {depth} expects {list(range(depth))}"
                )
            s[part] = [s[part][i] for i in range(depth)]
        check_site_tensors(wfile, name, s, keys[name], rank, None)
    try:
        config = NeatConfig(
            patterns=tuple("re:" + re.escape(n) for n in sites),
            trainable=tuple("re:" + re.escape(n) for n in trainable),
            rank=rank,
            depth=2 + 2 * depth,
            activation=act,
            scale=scale,
        )
    except ConfigError as exc:
        raise AdapterMismatchError(f"{cpath}: {exc}") from None
    return LoadedAdapters(config, sites, trainable, {}, "peft", folder)
