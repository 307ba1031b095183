"""`LoadedAdapters`: a checkpoint read into memory, in our terms, whatever format it came from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import NeatConfig
from ..errors import AdapterMismatchError


@dataclass
class LoadedAdapters:
    """What `read_adapters(folder)` returns.

    config:    the NEAT options (patterns select exactly the saved sites).
    sites:     parameter name → {"A": (d_out, r), "B": (d_out, r), "encoders": [...], "decoders": [...]}.
    trainable: parameter name → tensor, for parameters trained in full (e.g. a new head).
    site_meta: parameter name → what our format records of the site (layout, aliases, base fingerprint, …);
               empty for PEFT checkpoints, which record none of it.
    format:    "neat" or "peft".
    base_model: the class name of the model the adapters were trained on, where recorded.
    """

    config: NeatConfig
    sites: dict[str, dict]
    trainable: dict[str, torch.Tensor]
    site_meta: dict[str, dict]
    format: str
    path: Path
    base_model: str | None = None
    extra: dict = field(default_factory=dict)


def refuse_expert_sites(loaded: LoadedAdapters, what: str):
    """Raise AdapterMismatchError if `loaded` holds adapters of routed-expert stacks, which `what` (a consumer that
    finds sites through the 2-D op table: the compile backend's adapters=, serve) does not apply yet — rather than
    leave them out silently."""
    experts = [n for n, meta in loaded.site_meta.items() if meta.get("experts")]
    if experts:
        shown = ", ".join(experts[:6]) + (f", … ({len(experts) - 6} more)" if len(experts) > 6 else "")
        raise AdapterMismatchError(
            f"{loaded.path}: {what} does not apply adapters of routed-expert stacks yet: {shown}. Load them onto the "
            f"model (neat_fx.load_adapters) and fold or merge (neat_fx.fold / neat_fx.merge_into), or save without "
            f"them (transform with exclude=)."
        )


_MISSING = object()


def mismatch(path, field: str, problem: str, expected: str) -> AdapterMismatchError:
    """The error for a malformed adapter file: names the file, the field, what is wrong and what was expected."""
    return AdapterMismatchError(f"{path}: {field} {problem}; expected {expected}")


def get_field(meta: dict, key: str, types, path, expected: str, *, prefix: str = "", default=_MISSING):
    """`meta[key]`, checked to be of `types` (bool is never an int here), else AdapterMismatchError."""
    name = f"{prefix}{key}"
    if key not in meta:
        if default is not _MISSING:
            return default
        raise mismatch(path, f"field {name!r}", "is missing", expected)
    v = meta[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in _as_tuple(types)):
        raise mismatch(path, f"field {name!r}", f"is {v!r} ({type(v).__name__})", expected)
    return v


def finite_number(meta: dict, key: str, path, *, prefix: str = "", default=_MISSING) -> float:
    v = get_field(meta, key, (int, float), path, "a finite number", prefix=prefix, default=default)
    if not math.isfinite(float(v)):
        raise mismatch(
            path, f"field {prefix + key!r}", f"is {v!r}", "a finite number (a NaN or inf scale poisons every output)"
        )
    return float(v)


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def check_site_tensors(
    path, site: str, parts: dict, keys: dict, rank: int, d_out: int | None, dtype=None, experts: int = 0
):
    """Shapes and dtypes of one site's tensors against the config, before anything is written anywhere:
    A and B (d_out, r), every encoder and decoder (r, r), floating point (`dtype` when the config records it);
    a stack of `experts` routed experts has each with a leading (E,) dimension.
    `keys` maps "A", "B", ("encoders", i), ("decoders", i) to the tensor's name in the file."""
    lead = (experts,) if experts else ()
    a = parts["A"]
    d = d_out if d_out is not None else (a.shape[-2] if a.dim() == 2 + len(lead) else None)
    want = {"A": (*lead, d, rank), "B": (*lead, d, rank)}
    for part in ("encoders", "decoders"):
        for i in range(len(parts[part])):
            want[(part, i)] = (*lead, rank, rank)
    e = "E, " if experts else ""
    for k, shape in want.items():
        t = parts[k] if isinstance(k, str) else parts[k[0]][k[1]]
        what = f"({e}{'d_out, r' if k in ('A', 'B') else 'r, r'})"
        if tuple(t.shape) != shape:
            raise AdapterMismatchError(
                f"{path}: tensor {keys[k]} of site {site} has shape {tuple(t.shape)}; expected {shape} = {what} "
                f"for rank {rank}{f' and {experts} experts' if experts else ''}; nothing was loaded (the file does "
                f"not belong to this config: save again)"
            )
        if not t.dtype.is_floating_point or (dtype is not None and t.dtype != dtype):
            raise AdapterMismatchError(
                f"{path}: tensor {keys[k]} of site {site} has dtype {t.dtype}; expected "
                f"{dtype if dtype is not None else 'a floating-point dtype'}; nothing was loaded"
            )
