"""Hugging Face PEFT's PEANuT checkpoints (`adapter_config.json` + `adapter_model.safetensors`): the same
method (NEAT), read and written so users' existing checkpoints work both ways. PEFT records no base
fingerprints or layouts, so loads of this format check shapes only."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..activations import from_peft, peft_names, to_peft
from ..config import NeatConfig
from ..containers import NeatModule
from ..errors import AdapterMismatchError
from ..names import module_name
from .loaded import LoadedAdapters
from .writing import write_pair

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save(nm: NeatModule, folder: Path):
    act = nm.neat_config.activation
    if to_peft(act) is None:
        raise AdapterMismatchError(
            f"PEFT's PEANuT has no {act!r} activation (it takes transformers' ACT2FN names); save with format='neat'"
        )
    unsupported = []
    for s in nm.site_infos:
        try:
            mod = nm.model.get_submodule(module_name(s.name))
        except AttributeError:
            mod = None
        if not s.name.endswith(".weight") or not isinstance(mod, nn.Linear) or s.layout != "out_in":
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
        stem = PREFIX + module_name(s.name)
        tensors[f"{stem}.peanut_A.weight"] = ad.A.t()
        tensors[f"{stem}.peanut_B.weight"] = ad.B
        for i, e in enumerate(ad.encoders):
            tensors[f"{stem}.peanut_encoders.{i}.weight"] = e
        for i, d in enumerate(ad.decoders):
            tensors[f"{stem}.peanut_decoders.{i}.weight"] = d
    modules_to_save = set()
    for key, name in nm.trainable_names.items():
        tensors[PREFIX + name] = nm.trainable[key]
        modules_to_save.add(name.rsplit(".", 1)[0] if "." in name else name)
    for mod_name in sorted(modules_to_save):
        params = {f"{mod_name}.{n}" for n, _ in nm.model.get_submodule(mod_name).named_parameters()}
        missing = sorted(params - set(nm.trainable_names.values()))
        if missing:
            raise AdapterMismatchError(
                f"PEFT saves whole modules (modules_to_save); {mod_name} has parameters not trained in full: "
                f"{', '.join(missing)}. Add them to trainable= or save with format='neat'."
            )

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
            "target_modules": sorted(module_name(s.name) for s in nm.site_infos),
            "exclude_modules": None,
            "modules_to_save": sorted(modules_to_save) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "init_weights": True,
            "inference_mode": True,
            "revision": None,
            "auto_mapping": None,
        }

    write_pair(folder, WEIGHTS, tensors, CONFIG, make_config)


def read(folder: Path) -> LoadedAdapters:
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("peft_type") != "PEANUT":
        raise AdapterMismatchError(
            f"{folder / CONFIG} has peft_type {meta.get('peft_type')!r}; neat_fx reads PEFT 'PEANUT' checkpoints only"
        )
    act = from_peft(meta.get("act_fn", "relu"))
    if act is None:
        raise AdapterMismatchError(
            f"PEFT activation {meta.get('act_fn')!r} has no neat_fx equivalent; supported: {peft_names()}"
        )
    wfile = folder / WEIGHTS
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} is missing (neat_fx reads safetensors checkpoints only, never .bin pickles)")
    tensors = load_file(str(wfile))
    depth = int(meta.get("depth", 0))
    sites, trainable = {}, {}
    rx = re.compile(r"^(?:base_model\.model\.)?(.*)\.peanut_(A|B|encoders|decoders)(?:\.(\d+))?\.weight$")
    for k, v in tensors.items():
        m = rx.match(k)
        if m is None:
            name = k[len(PREFIX) :] if k.startswith(PREFIX) else k
            trainable[name] = v
            continue
        site = sites.setdefault(m.group(1) + ".weight", {"encoders": {}, "decoders": {}})
        part, idx = m.group(2), m.group(3)
        if part == "A":
            site["A"] = v.t()
        elif part == "B":
            site["B"] = v
        else:
            site[part][int(idx)] = v
    for name, s in sites.items():
        if "A" not in s or "B" not in s:
            raise AdapterMismatchError(f"{wfile}: site {name} lacks peanut_A or peanut_B")
        for part in ("encoders", "decoders"):
            if sorted(s[part]) != list(range(depth)):
                raise AdapterMismatchError(
                    f"{wfile}: site {name} has {part} {sorted(s[part])}, depth {depth} expects {list(range(depth))}"
                )
            s[part] = [s[part][i] for i in range(depth)]
    config = NeatConfig(
        patterns=tuple("re:" + re.escape(n) for n in sites),
        trainable=tuple("re:" + re.escape(n) for n in trainable),
        rank=int(meta["r"]),
        depth=2 + 2 * depth,
        activation=act,
        scale=float(meta.get("scaling", 1.0)),
    )
    return LoadedAdapters(config, sites, trainable, {}, "peft", folder)
