"""Our adapter format: `adapters.safetensors` + `neat_config.json` (options, sites with their layouts and base
fingerprints, the weights' checksum). JSON and safetensors only — never pickles."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from .._version import __version__
from ..atomic import sha256_file
from ..config import NeatConfig
from ..containers import NeatModule
from ..errors import AdapterMismatchError
from .fingerprint import fingerprint
from .loaded import LoadedAdapters
from .writing import write_pair

CONFIG = "neat_config.json"
WEIGHTS = "adapters.safetensors"
FORMAT = "neat_fx.adapters"
FORMAT_VERSION = 1


def save(nm: NeatModule, folder: Path):
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
                    "dtype": s.dtype,
                    "fingerprint": fingerprint(nm.weight_of(s)),
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

    write_pair(folder, WEIGHTS, tensors, CONFIG, make_config)


def read(folder: Path) -> LoadedAdapters:
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{folder / CONFIG} is not a neat_fx adapter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterMismatchError(
            f"{folder} was written by a newer neat_fx (format {meta['format_version']}); upgrade neat_fx"
        )
    wfile = folder / meta["weights"]["file"]
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} is missing; the adapter folder is incomplete")
    if sha256_file(wfile) != meta["weights"]["sha256"]:
        raise AdapterMismatchError(
            f"{wfile} does not match the checksum in {CONFIG} (an interrupted or mixed save); save again"
        )
    tensors = load_file(str(wfile))
    config = NeatConfig.from_dict(meta["config"])
    sites, site_meta = {}, {}
    for s in meta["sites"]:
        n = s["name"]
        sites[n] = {
            "A": tensors[f"{n}.neat_A"],
            "B": tensors[f"{n}.neat_B"],
            "encoders": [tensors[f"{n}.neat_encoders.{i}"] for i in range(config.hidden_layers)],
            "decoders": [tensors[f"{n}.neat_decoders.{i}"] for i in range(config.hidden_layers)],
        }
        site_meta[n] = s
    trainable = {t["name"]: tensors[t["name"]] for t in meta["trainable"]}
    return LoadedAdapters(config, sites, trainable, site_meta, "neat", folder, base_model=meta.get("base_model"))
