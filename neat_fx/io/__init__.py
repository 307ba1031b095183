"""Adapters on disk, in our format (`native`) or Hugging Face PEFT's PEANuT (`peft`): save, read, load.
JSON and safetensors only — never pickles. A save is one atomic switch (see `writing`): a kill at any instant
leaves exactly the previous adapters or exactly the new ones; nothing is changed by a load until every check
(checksum, fields, every tensor's shape and dtype) has passed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import previous_copy
from ..containers import NeatModule, SiteInfo
from ..distributed import copy_into
from ..errors import AdapterMismatchError
from ..quantized import describe, format_label
from . import lora, native, peft
from .fingerprint import fingerprint, fingerprint_matches
from .loaded import LoadedAdapters

#: format name → module with save(nm, folder) (and read(folder), except the export-only LoRA form).
FORMATS = {"neat": native, "peft": peft, "lora": lora}


def save_adapters(nm: NeatModule, path, *, format: str = "neat") -> Path:
    """Save the adapters (and parameters trained in full) of `nm` to the folder `path`.

    format="neat": `adapters.safetensors` + `neat_config.json` (options, patterns, sites, base shapes and
    fingerprints). format="peft": a Hugging Face PEFT PEANuT checkpoint, for sites PEFT supports
    (nn.Linear modules). format="lora": the exact LoRA form (`lora_A = Hᵀ`, `lora_B = B`, `lora_alpha = s·r`),
    a PEFT LoRA checkpoint any LoRA server loads, valid on this exact base only (export only: it cannot be
    loaded back as NEAT adapters). Returns the folder.

    A kill at any instant leaves exactly the previous adapters or exactly the new ones for `read_adapters` /
    `load_adapters` (see `neat_fx.io.writing`); format="neat" never touches other files in the folder,
    format="peft" swaps the whole folder in and so refuses one that holds other files.
    """
    if not isinstance(nm, NeatModule):
        raise TypeError(f"save_adapters expects a NeatModule from neat_fx.transform, got {type(nm).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; save_adapters writes a folder")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    FORMATS[format].save(nm, folder)
    return folder


def read_adapters(path) -> LoadedAdapters:
    """Read the adapter folder `path` (our format or a PEFT PEANuT checkpoint) into memory, checked (our format:
    the weights' checksum), without touching any model. What `load_adapters`, the compile backend and the
    CLI read."""
    folder = Path(path)
    if not folder.exists() and previous_copy(folder).is_dir():
        folder = previous_copy(folder)  # a kill between the two renames of a PEFT save: the previous copy
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the folder save_adapters wrote")
    for fmt in (native, peft):  # peft.read tells a LoRA checkpoint (ours or not) apart and refuses it
        if (folder / fmt.CONFIG).exists():
            return fmt.read(folder)
    raise FileNotFoundError(
        f"{folder} holds neither {native.CONFIG} (neat_fx) nor {peft.CONFIG} (PEFT); pass the folder save_adapters "
        f"wrote"
    )


def load_adapters(target, path, example_inputs=None, **transform_options):
    """Load adapters saved by `save_adapters` (or by PEFT's PEANuT) from the folder `path`.

    target: a NeatModule whose sites and rank/depth match the checkpoint (loaded in place, returned), or
    a plain model, which is transformed first with the checkpoint's options (then `example_inputs` is
    required). Nothing is changed unless every site, shape and base-weight fingerprint matches.
    """
    loaded = read_adapters(path)
    if isinstance(target, NeatModule):
        _check_and_copy(target, loaded, path)
        return target
    if not isinstance(target, nn.Module):
        raise TypeError(f"load_adapters expects a NeatModule or an nn.Module, got {type(target).__name__}")
    if example_inputs is None:
        raise AdapterMismatchError(
            "load_adapters onto a plain model transforms it first: pass example_inputs= (as for neat_fx.transform)"
        )
    from ..transform import restoring_requires_grad

    with restoring_requires_grad(target):  # a load that fails after the transform leaves the model as given
        nm = _transform_for(target, loaded, path, example_inputs, transform_options)
        _check_and_copy(nm, loaded, path)
    return nm


def _transform_for(model: nn.Module, loaded: LoadedAdapters, path, example_inputs, transform_options) -> NeatModule:
    """`model` transformed with the checkpoint's options and exactly its sites."""
    from ..transform import transform

    c = loaded.config
    options = dict(
        rank=c.rank,
        depth=c.depth,
        activation=c.activation,
        scale=c.scale,
        trainable=["re:" + re.escape(n) for n in loaded.trainable],
        capture=c.capture,
        modes=c.modes,
        adapter_dtype=c.adapter_dtype,
    )
    options.update(transform_options)
    try:
        return transform(model, ["re:" + re.escape(n) for n in loaded.sites], example_inputs, **options)
    except Exception as exc:
        raise AdapterMismatchError(f"the adapters in {path} do not fit this model: {exc}") from exc


def _check_and_copy(nm: NeatModule, loaded: LoadedAdapters, path):
    problems = []
    c = loaded.config
    if c.rank != nm.neat_config.rank or c.depth != nm.neat_config.depth:
        problems.append(
            f"the checkpoint has rank={c.rank}, depth={c.depth}; "
            f"nm has rank={nm.neat_config.rank}, depth={nm.neat_config.depth} "
            f"(transform with rank={c.rank}, depth={c.depth}, or load onto the plain model)"
        )
    by_alias: dict[str, SiteInfo] = {}
    for s in nm.site_infos:
        for a in s.aliases:
            by_alias[a] = s
    matched = {}
    for name in loaded.sites:
        s = by_alias.get(name)
        if s is None:
            problems.append(f"site {name} of the checkpoint is not adapted in nm")
        else:
            matched[s.key] = (s, name)
    for s in nm.site_infos:
        if s.key not in matched:
            problems.append(f"site {s.name} of nm has no adapter in the checkpoint")
    for s, name in matched.values():
        t = loaded.sites[name]
        ad = nm.adapters[s.key]
        if tuple(t["A"].shape) != tuple(ad.A.shape) or tuple(t["B"].shape) != tuple(ad.B.shape):
            problems.append(
                f"{name}: checkpoint A{tuple(t['A'].shape)} B{tuple(t['B'].shape)}, "
                f"nm A{tuple(ad.A.shape)} B{tuple(ad.B.shape)}"
            )
        for part in ("encoders", "decoders"):
            mine, theirs = list(getattr(ad, part)), t[part]
            if len(mine) != len(theirs):
                problems.append(f"{name}: checkpoint has {len(theirs)} {part}, nm {len(mine)}")
                continue
            for i, (p, v) in enumerate(zip(mine, theirs)):
                if tuple(p.shape) != tuple(v.shape) or not v.dtype.is_floating_point:
                    problems.append(
                        f"{name}: checkpoint {part}[{i}] {tuple(v.shape)} {v.dtype}, nm {tuple(p.shape)} {p.dtype}"
                    )
        meta = loaded.site_meta.get(name)
        if meta is not None:
            saved_q, now_q = meta.get("quantization"), describe(nm.base_tensor(s)) if s.quantization else None
            if meta["layout"] != s.layout:
                problems.append(f"{name}: saved for layout {meta['layout']}, nm uses {s.layout}")
            elif saved_q != now_q:
                problems.append(
                    f"{name}: the adapters were trained on a base weight held {format_label(saved_q)}, this one is "
                    f"{format_label(now_q)}: H = σ(W0ᵀ A) is computed from the (dequantized) W0, so they would compute "
                    f"another function here. Quantize this base as the training base was (see docs/quantized.md), "
                    f"or load them onto that base"
                )
            elif not fingerprint_matches(meta["fingerprint"], nm.weight_of(s)):
                problems.append(
                    f"{name}: the base weight differs from the one the adapters were trained on "
                    f"(shape {meta['fingerprint']['shape']}, fingerprint mismatch)"
                )
    names = dict(nm.trainable_names)
    inv = {v: k for k, v in names.items()}
    for name, v in loaded.trainable.items():
        if name not in inv:
            problems.append(
                f"{name} is trained in full in the checkpoint but not in nm (transform with trainable=[{name!r}])"
            )
        elif tuple(v.shape) != tuple(nm.trainable[inv[name]].shape):
            problems.append(f"{name}: checkpoint shape {tuple(v.shape)}, nm {tuple(nm.trainable[inv[name]].shape)}")
        elif v.dtype.is_floating_point != nm.trainable[inv[name]].dtype.is_floating_point:
            problems.append(f"{name}: checkpoint dtype {v.dtype}, nm {nm.trainable[inv[name]].dtype}")
    for name in inv:
        if name not in loaded.trainable:
            problems.append(f"{name} is trained in full in nm but missing from the checkpoint")
    if problems:
        shown = problems[:12] + ([f"… {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise AdapterMismatchError(
            f"the adapters in {path} do not fit this module; nothing was loaded:\n  - " + "\n  - ".join(shown)
        )
    with torch.no_grad():
        for s, name in matched.values():
            t, ad = loaded.sites[name], nm.adapters[s.key]
            copy_into(ad.A, t["A"])
            copy_into(ad.B, t["B"])
            for p, v in zip(list(ad.encoders) + list(ad.decoders), t["encoders"] + t["decoders"]):
                copy_into(p, v)
            ad.activation = c.activation
            ad.scale = c.scale
        for name, v in loaded.trainable.items():
            copy_into(nm.trainable[inv[name]], v)
    nm.neat_config = dataclasses.replace(nm.neat_config, activation=c.activation, scale=c.scale)


__all__ = [
    "FORMATS",
    "LoadedAdapters",
    "fingerprint",
    "fingerprint_matches",
    "load_adapters",
    "read_adapters",
    "save_adapters",
]
