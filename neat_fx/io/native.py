"""Our adapter format: `adapters.safetensors` + `neat_config.json` (options, sites with their layouts and base
fingerprints, the weights' checksum). JSON and safetensors only — never pickles."""

from __future__ import annotations

from pathlib import Path

import torch

from .._version import __version__
from ..config import NeatConfig
from ..containers import NeatModule
from ..errors import AdapterMismatchError, ConfigError
from ..quantized import describe
from .fingerprint import fingerprint
from .loaded import LoadedAdapters, check_site_tensors, finite_number, get_field, mismatch
from .writing import committed_weights, load_tensors, read_json, write_committed

CONFIG = "neat_config.json"
WEIGHTS = "adapters.safetensors"
FORMAT = "neat_fx.adapters"
FORMAT_VERSION = 1


def tensors_of(nm: NeatModule) -> dict[str, torch.nn.Parameter]:
    """nm's trained state by the names of our format: `<site>.neat_A`, `.neat_B`, `.neat_encoders.<i>`,
    `.neat_decoders.<i>`, and each parameter trained in full by its name in the model (the tensors themselves)."""
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
    return tensors


def save(nm: NeatModule, folder: Path):
    tensors = tensors_of(nm)

    def make_config(sha):
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "neat_fx_version": __version__,
            "config": nm.neat_config.to_dict(),
            "base_model": type(nm.model).__name__,
            "sites": [
                {
                    "name": s.name,
                    "aliases": list(s.aliases),
                    "kinds": s.kinds,
                    "layout": s.layout,
                    "d_in": s.d_in,
                    "d_out": s.d_out,
                    **({"experts": s.experts} if s.experts else {}),
                    "dtype": s.dtype,
                    "fingerprint": fingerprint(nm.weight_of(s)),
                    # the base's format: adapters trained on a quantized W0 compute another function on another W0
                    **({"quantization": describe(nm.base_tensor(s))} if s.quantization else {}),
                    "activation": nm.adapters[s.key].activation,
                    "scale": nm.adapters[s.key].scale,
                }
                for s in nm.site_infos
            ],
            "trainable": [
                {"name": name, "shape": list(nm.trainable[key].shape)} for key, name in nm.trainable_names.items()
            ],
            "weights": {"file": WEIGHTS, "sha256": sha},
        }

    write_committed(folder, WEIGHTS, tensors, CONFIG, make_config)


def read(folder: Path) -> LoadedAdapters:
    cpath = folder / CONFIG
    meta = read_json(cpath, "a neat_fx adapter config")
    if meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{cpath} is not a neat_fx adapter config (field 'format' is not {FORMAT!r})")
    version = get_field(meta, "format_version", int, cpath, f"an integer ≤ {FORMAT_VERSION}", default=0)
    if version > FORMAT_VERSION:
        raise AdapterMismatchError(f"{folder} was written by a newer neat_fx (format {version}); upgrade neat_fx")
    weights = get_field(meta, "weights", dict, cpath, "an object {'file': …, 'sha256': …}")
    wname = get_field(weights, "file", str, cpath, "a file name inside the folder", prefix="weights.")
    if wname in ("", ".", "..") or Path(wname).name != wname or "/" in wname or "\\" in wname:
        raise mismatch(
            cpath,
            "field 'weights.file'",
            f"is {wname!r}, not a plain file name",
            f"the name of a file inside {folder} (e.g. {WEIGHTS!r}); neat_fx reads no file outside the adapter "
            f"folder — fix the field or save again",
        )
    sha = get_field(weights, "sha256", str, cpath, "the weights' sha256 (64 hex digits)", prefix="weights.")
    cfg = get_field(meta, "config", dict, cpath, "an object of NeatConfig options")
    try:
        config = NeatConfig.from_dict(cfg)
    except (ConfigError, TypeError) as exc:
        field = next((f"config.{k}" for k in NeatConfig.field_names() if str(exc).startswith(f"{k} ")), "config")
        raise mismatch(cpath, f"field {field!r}", f"is invalid ({exc})", "the options save_adapters wrote") from None
    sites_meta = get_field(meta, "sites", list, cpath, "a list of sites")
    trainable_meta = get_field(meta, "trainable", list, cpath, "a list of parameters trained in full")
    for i, s in enumerate(sites_meta):
        if not isinstance(s, dict):
            raise mismatch(cpath, f"field 'sites[{i}]'", f"is {s!r}", "an object describing a site")
        p = f"sites[{i}]."
        get_field(s, "name", str, cpath, "the adapted parameter's name", prefix=p)
        get_field(s, "layout", str, cpath, "the site's layout ('out_in' or 'in_out')", prefix=p)
        fp = get_field(s, "fingerprint", dict, cpath, "the base weight's fingerprint", prefix=p)
        get_field(fp, "shape", list, cpath, "a list of integers", prefix=p + "fingerprint.")
        get_field(fp, "sample", list, cpath, "a list of numbers", prefix=p + "fingerprint.")
        finite_number(fp, "norm", cpath, prefix=p + "fingerprint.")
        if "quantization" in s:
            q = get_field(s, "quantization", dict, cpath, "the base weight's quantized format", prefix=p)
            get_field(q, "format", str, cpath, "a format name such as 'bnb.nf4'", prefix=p + "quantization.")
        get_field(s, "d_out", int, cpath, "an integer", prefix=p, default=None)
        if get_field(s, "experts", int, cpath, "the number of routed experts, an integer ≥ 0", prefix=p, default=0) < 0:
            raise mismatch(cpath, f"field '{p}experts'", f"is {s['experts']}", "an integer ≥ 0")
        if "scale" in s:
            finite_number(s, "scale", cpath, prefix=p)
    for i, t in enumerate(trainable_meta):
        if not isinstance(t, dict):
            raise mismatch(cpath, f"field 'trainable[{i}]'", f"is {t!r}", "an object {'name': …, 'shape': …}")
        get_field(t, "name", str, cpath, "a parameter name", prefix=f"trainable[{i}].")
        get_field(t, "shape", list, cpath, "a list of integers", prefix=f"trainable[{i}].")
    found = committed_weights(folder, wname, sha)
    if found is None:
        wfile = folder / wname
        if not wfile.exists():
            raise FileNotFoundError(f"{wfile} is missing; the adapter folder is incomplete")
        raise AdapterMismatchError(
            f"{wfile} does not match the checksum in {CONFIG} (an interrupted or mixed save); save again"
        )
    wfile, data = found
    tensors = load_tensors(wfile, data)

    def tensor(key, where):
        if key not in tensors:
            raise mismatch(
                wfile,
                f"tensor {key!r}",
                f"is missing (named by {CONFIG} field {where})",
                "the tensors of every site and trained parameter the config lists — a site was renamed, or the "
                "weights are from another save: save again",
            )
        return tensors[key]

    sites, site_meta = {}, {}
    for i, s in enumerate(sites_meta):
        n = s["name"]
        keys = {"A": f"{n}.neat_A", "B": f"{n}.neat_B"}
        for part in ("encoders", "decoders"):
            for j in range(config.hidden_layers):
                keys[(part, j)] = f"{n}.neat_{part}.{j}"
        where = f"sites[{i}].name"
        parts = {
            "A": tensor(keys["A"], where),
            "B": tensor(keys["B"], where),
            "encoders": [tensor(keys[("encoders", j)], where) for j in range(config.hidden_layers)],
            "decoders": [tensor(keys[("decoders", j)], where) for j in range(config.hidden_layers)],
        }
        check_site_tensors(wfile, n, parts, keys, config.rank, s.get("d_out"), config.dtype, s.get("experts", 0))
        sites[n] = parts
        site_meta[n] = s
    trainable = {}
    for i, t in enumerate(trainable_meta):
        v = tensor(t["name"], f"trainable[{i}].name")
        if list(v.shape) != list(t["shape"]) or not v.dtype.is_floating_point:
            raise AdapterMismatchError(
                f"{wfile}: tensor {t['name']} has shape {tuple(v.shape)} and dtype {v.dtype}; expected shape "
                f"{tuple(t['shape'])} ({CONFIG} field trainable[{i}].shape), floating point; nothing was loaded"
            )
        trainable[t["name"]] = v
    return LoadedAdapters(config, sites, trainable, site_meta, "neat", folder, base_model=meta.get("base_model"))
