"""Adapters on disk: our own format (safetensors + `neat_config.json`) and Hugging Face PEFT's PEANuT
checkpoints (`adapter_config.json` + `adapter_model.safetensors`). JSON and safetensors only — never
pickles. Files are written to temporary names, checked, then renamed; nothing is changed by a load
until every check has passed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import NeatConfig
from .errors import AdapterMismatchError
from .neat_module import NeatModule, SiteInfo

NATIVE_CONFIG = "neat_config.json"
NATIVE_WEIGHTS = "adapters.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."
_TO_PEFT_ACT = {"relu": "relu", "gelu": "gelu", "silu": "silu", "tanh": "tanh", "identity": "linear"}
_FROM_PEFT_ACT = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh", "linear": "identity"}


# -- sharded parameters (FSDP2) -------------------------------------------------------------------------
def is_sharded(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a parameter sharded by FSDP2 (a collective: every rank must call it), or `t`."""
    return t.full_tensor() if is_sharded(t) else t


def _copy_into(param: torch.Tensor, value: torch.Tensor):
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(device=param.device_mesh.device_type, dtype=param.dtype),
                                  param.device_mesh, param.placements)
    param.copy_(value)


# -- fingerprints -------------------------------------------------------------------------------------
def fingerprint(weight: torch.Tensor, n: int = 16) -> dict:
    """A few values at fixed positions and the norm: tells a different base model from this one, while a
    bf16/fp16 copy of the same weights still matches (compared with a tolerance)."""
    flat = full_tensor(weight).detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, steps=min(n, flat.numel())).round().long().to(flat.device)
    return {
        "shape": list(weight.shape),
        "sample": [float(v) for v in flat[idx].float().cpu()],
        "norm": float(flat.float().norm()),
    }


def _fingerprint_matches(saved: dict, weight: torch.Tensor) -> bool:
    now = fingerprint(weight, len(saved["sample"]))
    if now["shape"] != saved["shape"]:
        return False
    a = torch.tensor(saved["sample"], dtype=torch.float64)
    b = torch.tensor(now["sample"], dtype=torch.float64)
    scale = max(float(a.abs().max()), 1e-12)
    if not torch.allclose(a, b, rtol=2e-2, atol=1e-3 * scale):
        return False
    return abs(saved["norm"] - now["norm"]) <= 2e-2 * max(abs(saved["norm"]), 1e-12)


# -- atomic writing ---------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_in(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


def _write_pair(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    """Write weights, read them back, then the config; each under a temporary name, then renamed.

    Sharded (FSDP2) tensors are gathered first — a collective, so every rank calls this — and rank 0 alone
    writes; the others return once the files are in place."""
    sharded = any(is_sharded(v) for v in tensors.values())
    tensors = {k: full_tensor(v).detach().to("cpu").contiguous() for k, v in tensors.items()}
    if sharded:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            make_config("")  # the same collectives as rank 0's (fingerprints of sharded base weights)
            dist.barrier()
            return
        try:
            _write_pair_files(folder, weights_name, tensors, config_name, make_config)
        finally:
            dist.barrier()
        return
    _write_pair_files(folder, weights_name, tensors, config_name, make_config)


def _write_pair_files(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    folder.mkdir(parents=True, exist_ok=True)
    w_tmp = _tmp_in(folder, weights_name)
    c_tmp = _tmp_in(folder, config_name)
    try:
        save_file(tensors, str(w_tmp))
        back = load_file(str(w_tmp))
        if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
            raise OSError(f"verification of {w_tmp} failed: what was read back differs from what was written")
        config = make_config(_sha256(w_tmp))
        c_tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        os.replace(w_tmp, folder / weights_name)
        os.replace(c_tmp, folder / config_name)
    finally:
        for t in (w_tmp, c_tmp):
            if t.exists():
                t.unlink()


# -- saving ---------------------------------------------------------------------------------------
def save_adapters(nm: NeatModule, path, *, format: str = "neat") -> Path:
    """Save the adapters (and parameters trained in full) of `nm` to the folder `path`.

    format="neat": `adapters.safetensors` + `neat_config.json` (options, patterns, sites, base shapes and
    fingerprints). format="peft": a Hugging Face PEFT PEANuT checkpoint, for sites PEFT supports
    (nn.Linear modules). Returns the folder.
    """
    if not isinstance(nm, NeatModule):
        raise TypeError(f"save_adapters expects a NeatModule from neat_fx.transform, got {type(nm).__name__}")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; save_adapters writes a folder")
    if format == "neat":
        _save_native(nm, folder)
    elif format == "peft":
        _save_peft(nm, folder)
    else:
        raise ValueError(f"format must be 'neat' or 'peft', got {format!r}")
    return folder


def _save_native(nm: NeatModule, folder: Path):
    from . import __version__

    tensors = {}
    for s in nm.site_infos:
        ad = nm.adapters[s.key]
        tensors[f"{s.name}.neat_A"] = ad.A
        tensors[f"{s.name}.neat_B"] = ad.B
        for i, e in enumerate(ad.encoders):
            tensors[f"{s.name}.neat_encoders.{i}"] = e
        for i, d in enumerate(ad.decoders):
            tensors[f"{s.name}.neat_decoders.{i}"] = d
    for key, name in nm.trainable_names.items():
        tensors[name] = nm.trainable[key]

    def make_config(sha):
        return {
            "format": "neat_fx.adapters",
            "format_version": FORMAT_VERSION,
            "neat_fx_version": __version__,
            "config": nm.config.to_dict(),
            "base_model": type(nm.model).__name__,
            "sites": [
                {
                    "name": s.name, "aliases": list(s.aliases), "kinds": s.kinds, "layout": s.layout,
                    "d_in": s.d_in, "d_out": s.d_out,
                    "dtype": s.dtype, "fingerprint": fingerprint(nm.weight_of(s)),
                    "activation": nm.adapters[s.key].activation, "scale": nm.adapters[s.key].scale,
                }
                for s in nm.site_infos
            ],
            "trainable": [
                {"name": name, "shape": list(nm.trainable[key].shape)} for key, name in nm.trainable_names.items()
            ],
            "weights": {"file": NATIVE_WEIGHTS, "sha256": sha},
        }

    _write_pair(folder, NATIVE_WEIGHTS, tensors, NATIVE_CONFIG, make_config)


def _stem(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _save_peft(nm: NeatModule, folder: Path):
    act = nm.config.activation
    if act not in _TO_PEFT_ACT:
        raise AdapterMismatchError(
            f"PEFT's PEANuT has no {act!r} activation (it takes transformers' ACT2FN names); save with format='neat'"
        )
    unsupported = []
    for s in nm.site_infos:
        try:
            mod = nm.model.get_submodule(_stem(s.name))
        except AttributeError:
            mod = None
        if not s.name.endswith(".weight") or not isinstance(mod, nn.Linear) or s.layout != "out_in":
            unsupported.append(f"{s.name} ({s.kinds}, {type(mod).__name__ if mod is not None else 'no module'})")
    if unsupported:
        raise AdapterMismatchError(
            "PEFT's PEANuT supports nn.Linear modules only; these sites are not: "
            + "; ".join(unsupported) + ". Save with format='neat', or transform with exclude= for them."
        )
    tensors = {}
    for s in nm.site_infos:
        ad = nm.adapters[s.key]
        stem = _PEFT_PREFIX + _stem(s.name)
        tensors[f"{stem}.peanut_A.weight"] = ad.A.t()
        tensors[f"{stem}.peanut_B.weight"] = ad.B
        for i, e in enumerate(ad.encoders):
            tensors[f"{stem}.peanut_encoders.{i}.weight"] = e
        for i, d in enumerate(ad.decoders):
            tensors[f"{stem}.peanut_decoders.{i}.weight"] = d
    modules_to_save = set()
    for key, name in nm.trainable_names.items():
        tensors[_PEFT_PREFIX + name] = nm.trainable[key]
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
            "r": nm.config.rank,
            "depth": nm.config.hidden_layers,
            "act_fn": _TO_PEFT_ACT[act],
            "scaling": nm.config.scale,
            "target_modules": sorted(_stem(s.name) for s in nm.site_infos),
            "exclude_modules": None,
            "modules_to_save": sorted(modules_to_save) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "init_weights": True,
            "inference_mode": True,
            "revision": None,
            "auto_mapping": None,
        }

    _write_pair(folder, PEFT_WEIGHTS, tensors, PEFT_CONFIG, make_config)


# -- loading --------------------------------------------------------------------------------------
class _Loaded:
    """A checkpoint read into memory, in our terms: config, per-site tensors, trainable tensors."""

    def __init__(self, config: NeatConfig, sites: dict, trainable: dict, site_meta: dict, fmt: str):
        self.config, self.sites, self.trainable, self.site_meta, self.format = config, sites, trainable, site_meta, fmt


def _read(path) -> _Loaded:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the folder save_adapters wrote")
    if (folder / NATIVE_CONFIG).exists():
        return _read_native(folder)
    if (folder / PEFT_CONFIG).exists():
        return _read_peft(folder)
    raise FileNotFoundError(
        f"{folder} holds neither {NATIVE_CONFIG} (neat_fx) nor {PEFT_CONFIG} (PEFT); pass the folder save_adapters wrote"
    )


def _read_native(folder: Path) -> _Loaded:
    meta = json.loads((folder / NATIVE_CONFIG).read_text())
    if meta.get("format") != "neat_fx.adapters":
        raise AdapterMismatchError(f"{folder / NATIVE_CONFIG} is not a neat_fx adapter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{folder} was written by a newer neat_fx (format {meta['format_version']}); upgrade neat_fx"
        )
    wfile = folder / meta["weights"]["file"]
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} is missing; the adapter folder is incomplete")
    if _sha256(wfile) != meta["weights"]["sha256"]:
        raise AdapterMismatchError(
            f"{wfile} does not match the checksum in {NATIVE_CONFIG} (an interrupted or mixed save); save again"
        )
    tensors = load_file(str(wfile))
    config = NeatConfig.from_dict(meta["config"])
    sites, site_meta = {}, {}
    for s in meta["sites"]:
        n = s["name"]
        sites[n] = {
            "A": tensors[f"{n}.neat_A"], "B": tensors[f"{n}.neat_B"],
            "encoders": [tensors[f"{n}.neat_encoders.{i}"] for i in range(config.hidden_layers)],
            "decoders": [tensors[f"{n}.neat_decoders.{i}"] for i in range(config.hidden_layers)],
        }
        site_meta[n] = s
    trainable = {t["name"]: tensors[t["name"]] for t in meta["trainable"]}
    return _Loaded(config, sites, trainable, site_meta, "neat")


def _read_peft(folder: Path) -> _Loaded:
    meta = json.loads((folder / PEFT_CONFIG).read_text())
    if meta.get("peft_type") != "PEANUT":
        raise AdapterMismatchError(
            f"{folder / PEFT_CONFIG} has peft_type {meta.get('peft_type')!r}; neat_fx reads PEFT 'PEANUT' checkpoints only"
        )
    act = meta.get("act_fn", "relu")
    if act not in _FROM_PEFT_ACT:
        raise AdapterMismatchError(f"PEFT activation {act!r} has no neat_fx equivalent; supported: {sorted(_FROM_PEFT_ACT)}")
    wfile = folder / PEFT_WEIGHTS
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} is missing (neat_fx reads safetensors checkpoints only, never .bin pickles)")
    tensors = load_file(str(wfile))
    depth = int(meta.get("depth", 0))
    config = NeatConfig(
        patterns=(), rank=int(meta["r"]), depth=2 + 2 * depth, activation=_FROM_PEFT_ACT[act],
        scale=float(meta.get("scaling", 1.0)),
    )
    sites, trainable = {}, {}
    rx = re.compile(r"^(?:base_model\.model\.)?(.*)\.peanut_(A|B|encoders|decoders)(?:\.(\d+))?\.weight$")
    for k, v in tensors.items():
        m = rx.match(k)
        if m is None:
            name = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k
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
                raise AdapterMismatchError(f"{wfile}: site {name} has {part} {sorted(s[part])}, depth {depth} expects {list(range(depth))}")
            s[part] = [s[part][i] for i in range(depth)]
    config.patterns = tuple("re:" + re.escape(n) for n in sites)
    config.trainable = tuple("re:" + re.escape(n) for n in trainable)
    return _Loaded(config, sites, trainable, {}, "peft")


def load_adapters(target, path, example_inputs=None, **transform_options):
    """Load adapters saved by `save_adapters` (or by PEFT's PEANuT) from the folder `path`.

    target: a NeatModule whose sites and rank/depth match the checkpoint (loaded in place, returned), or
    a plain model, which is transformed first with the checkpoint's options (then `example_inputs` is
    required). Nothing is changed unless every site, shape and base-weight fingerprint matches.
    """
    loaded = _read(path)
    if not isinstance(target, NeatModule):
        if not isinstance(target, nn.Module):
            raise TypeError(f"load_adapters expects a NeatModule or an nn.Module, got {type(target).__name__}")
        if example_inputs is None:
            raise AdapterMismatchError(
                "load_adapters onto a plain model transforms it first: pass example_inputs= (as for neat_fx.transform)"
            )
        from .transform import transform

        c = loaded.config
        names = list(loaded.sites)
        options = dict(
            rank=c.rank, depth=c.depth, activation=c.activation, scale=c.scale,
            trainable=["re:" + re.escape(n) for n in loaded.trainable], capture=c.capture, modes=c.modes,
            adapter_dtype=c.adapter_dtype,
        )
        options.update(transform_options)
        try:
            target = transform(target, ["re:" + re.escape(n) for n in names], example_inputs, **options)
        except Exception as exc:
            raise AdapterMismatchError(f"the adapters in {path} do not fit this model: {exc}") from exc
    _check_and_copy(target, loaded, path)
    return target


def _check_and_copy(nm: NeatModule, loaded: _Loaded, path):
    problems = []
    c = loaded.config
    if c.rank != nm.config.rank or c.depth != nm.config.depth:
        problems.append(
            f"the checkpoint has rank={c.rank}, depth={c.depth}; nm has rank={nm.config.rank}, depth={nm.config.depth} "
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
            problems.append(f"{name}: checkpoint A{tuple(t['A'].shape)} B{tuple(t['B'].shape)}, nm A{tuple(ad.A.shape)} B{tuple(ad.B.shape)}")
        meta = loaded.site_meta.get(name)
        if meta is not None:
            if meta["layout"] != s.layout:
                problems.append(f"{name}: saved for layout {meta['layout']}, nm uses {s.layout}")
            elif not _fingerprint_matches(meta["fingerprint"], nm.weight_of(s)):
                problems.append(
                    f"{name}: the base weight differs from the one the adapters were trained on "
                    f"(shape {meta['fingerprint']['shape']}, fingerprint mismatch)"
                )
    names = dict(nm.trainable_names)
    inv = {v: k for k, v in names.items()}
    for name, v in loaded.trainable.items():
        if name not in inv:
            problems.append(f"{name} is trained in full in the checkpoint but not in nm (transform with trainable=[{name!r}])")
        elif tuple(v.shape) != tuple(nm.trainable[inv[name]].shape):
            problems.append(f"{name}: checkpoint shape {tuple(v.shape)}, nm {tuple(nm.trainable[inv[name]].shape)}")
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
            _copy_into(ad.A, t["A"])
            _copy_into(ad.B, t["B"])
            for p, v in zip(list(ad.encoders) + list(ad.decoders), t["encoders"] + t["decoders"]):
                _copy_into(p, v)
            ad.activation = c.activation
            ad.scale = c.scale
        for name, v in loaded.trainable.items():
            _copy_into(nm.trainable[inv[name]], v)
    nm.config.activation, nm.config.scale = c.activation, c.scale
