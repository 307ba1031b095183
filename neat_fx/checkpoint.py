"""Crash-safe training checkpoints: adapters, optimizer, scheduler, RNG state and step, written atomically.

    save_checkpoint(folder, nm, opt, sched, step=step)      # every N steps
    state = load_checkpoint(folder, nm, opt, sched)         # after a crash: state["step"] steps were done

A checkpoint is a folder: `adapters/` (the `save_adapters` format), `trainer_state.safetensors` (optimizer
tensors, torch RNG) and `trainer_state.json` (step, optimizer class and hyper-parameters, scheduler, Python RNG,
and what it was made for). It is written whole under a temporary name, read back, then swapped in with renames
(neat_fx.atomic.staged_folder): a kill at any moment leaves the previous checkpoint or the new one, never a
mix (a kill between the two renames leaves `<folder>.old`, which `load_checkpoint` falls back to, as it does
when a copy is damaged). `load_checkpoint` checks everything (the model, the adapters' configuration, the
run's settings given as `expect=`, the optimizer's class and the shape of each state tensor) before it
restores anything. JSON and safetensors only.

Under FSDP2 every rank calls both: the adapters and the optimizer state are gathered whole (they are small) and
rank 0 writes; on load each rank reads the files and keeps its shard. A checkpoint of a sharded run loads into
one process and the other way round.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import previous_copy, staged_folder
from .containers import NeatModule
from .distributed import any_sharded, barrier, full_tensor, is_rank_zero, is_sharded, shard_like
from .errors import AdapterMismatchError
from .io import load_adapters, read_adapters, save_adapters
from .io.writing import load_tensors, read_json

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = "neat_fx.checkpoint"


def _split_optimizer(sd: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as (tensors for safetensors, everything else for JSON)."""
    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().cpu().contiguous()
                state[str(idx)][k] = {"tensor": f"optimizer.{idx}.{k}"}
            else:
                state[str(idx)][k] = {"value": v}
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _join_optimizer(meta: dict, tensors: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _signature(nm: NeatModule) -> dict:
    c = nm.neat_config
    return {
        "sites": [s.name for s in nm.sites()],
        "trainable": sorted(nm.trainable_names.values()),
        "rank": c.rank,
        "depth": c.depth,
        "activation": c.activation,
        "scale": c.scale,
    }


def save_checkpoint(
    folder, nm: NeatModule, optimizer=None, scheduler=None, *, step: int, extra: dict | None = None
) -> Path:
    """Write a resumable checkpoint of a training run to `folder` (replaced atomically); returns it."""
    _check_module(nm, "save_checkpoint")
    folder = Path(folder)
    sharded = any_sharded(nm)
    # Sharded (FSDP2): every rank calls this; the adapters and the optimizer state are gathered whole (they are
    # small), rank 0 writes, the others wait, so the checkpoint loads into any number of ranks, or none.
    opt_sd = _whole_optimizer_state(optimizer) if optimizer is not None else None
    if sharded and not is_rank_zero():
        save_adapters(nm, folder / "adapters")  # its gathering collectives; only rank 0 writes
        barrier()
        return folder
    try:
        _write(folder, nm, opt_sd, optimizer, scheduler, step, extra)
    finally:
        if sharded:
            barrier()
    return folder


def _whole_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (a collective under FSDP2: the same
    order on every rank)."""
    sd = optimizer.state_dict()
    for idx in sorted(sd["state"]):
        entry = dict(sd["state"][idx])  # state_dict() shares these dicts with the live optimizer state
        for k in sorted(entry):
            if is_sharded(entry[k]):
                entry[k] = full_tensor(entry[k])
        sd["state"][idx] = entry
    return sd


def _shard_like_parameters(opt_sd: dict, optimizer):
    """Give each whole state tensor the sharding of its parameter (FSDP2), so each rank keeps its part."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = [i for g in opt_sd["param_groups"] for i in g["params"]]
    by_id = {i: params[n] for n, i in enumerate(index)}
    for idx, entry in opt_sd["state"].items():
        p = by_id[idx]
        for k, v in entry.items():
            if is_sharded(p) and isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                entry[k] = shard_like(v, p)


def _write(folder: Path, nm, opt_sd, optimizer, scheduler, step, extra):
    with staged_folder(folder, check=_read) as tmp:  # _read: read back before it replaces anything
        save_adapters(nm, tmp / "adapters")
        tensors, opt_meta = _split_optimizer(opt_sd) if opt_sd is not None else ({}, None)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "format": FORMAT,
            "step": int(step),
            "signature": _signature(nm),
            "optimizer": opt_meta,
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_python": _to_json(random.getstate()),
            "extra": extra or {},
        }
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta))


def _check_module(nm, what: str):
    if not isinstance(nm, NeatModule):
        raise TypeError(
            f"{what} expects the NeatModule being trained (from neat_fx.transform), got "
            f"{type(nm).__name__}; pass nm itself (for DDP: ddp.module), not the base model"
        )


def _to_json(v):
    if isinstance(v, tuple):
        return {"tuple": [_to_json(x) for x in v]}
    return v


def _from_json(v):
    if isinstance(v, dict) and "tuple" in v:
        return tuple(_from_json(x) for x in v["tuple"])
    return v


#: fields of trainer_state.json and the types they must have
_FIELDS = {
    "step": int,
    "signature": dict,
    "optimizer": (dict, type(None)),
    "scheduler": (dict, type(None)),
    "rng_python": dict,
    "extra": dict,
}


def _read(folder: Path):
    """(meta, tensors) of the checkpoint in `folder`, checked; AdapterMismatchError naming the file otherwise."""
    path = folder / STATE_JSON
    try:
        meta = read_json(path, "a neat_fx checkpoint's trainer state")
    except OSError as exc:
        raise AdapterMismatchError(f"{path} cannot be read ({exc}); the checkpoint is damaged") from exc
    if meta.get("format") != FORMAT:
        raise AdapterMismatchError(f'{path} is not a neat_fx checkpoint (no "format": "{FORMAT}")')
    bad = [
        f"{k} (expected {' or '.join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))}, "
        f"got {type(meta.get(k)).__name__ if k in meta else 'nothing'})"
        for k, kind in _FIELDS.items()
        if k not in meta or not isinstance(meta[k], kind) or (kind is int and isinstance(meta[k], bool))
    ]
    if bad:
        raise AdapterMismatchError(f"{path} lacks or has malformed fields: " + ", ".join(bad))
    tpath = folder / STATE_TENSORS
    if not tpath.is_file():
        raise AdapterMismatchError(f"{tpath} is missing; the checkpoint is damaged")
    tensors = load_tensors(tpath)
    missing = [k for k in _tensor_names(meta) if k not in tensors]
    if missing:
        raise AdapterMismatchError(f"{tpath} lacks the tensors {missing} that {STATE_JSON} refers to")
    return meta, tensors


def _tensor_names(meta) -> list[str]:
    names = ["rng.torch"]
    for entry in (meta["optimizer"] or {}).get("state", {}).values():
        names += [v["tensor"] for v in entry.values() if isinstance(v, dict) and "tensor" in v]
    return names


def find_checkpoint(folder) -> Path | None:
    """`folder` if it holds a checkpoint, else the `.old` one a kill between two renames left, else None."""
    folder = Path(folder)
    for f in (folder, previous_copy(folder)):
        if (f / STATE_JSON).exists():
            return f
    return None


def _read_first(folder: Path):
    """(path, meta, tensors) of the first readable copy: `folder`, else `<folder>.old`. When a copy is damaged
    and no other is readable, AdapterMismatchError names the damaged file."""
    first_error = None
    for f in (folder, previous_copy(folder)):
        if not (f / STATE_JSON).exists():
            continue
        try:
            meta, tensors = _read(f)
            _read_adapters(f / "adapters")
            return f, meta, tensors
        except AdapterMismatchError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise FileNotFoundError(f"no neat_fx checkpoint in {folder} (expected {STATE_JSON}); start without resuming")


def _read_adapters(folder: Path):
    """Read (and checksum) the checkpoint's adapters, so a damaged copy is found before anything is loaded."""
    try:
        read_adapters(folder)
    except Exception as exc:  # a damaged folder: the reader's own error, or a raw one from malformed files
        raise AdapterMismatchError(
            f"the adapters in {folder} cannot be read ({exc}); the checkpoint is damaged"
        ) from exc


def _optimizer_problems(meta, opt_sd, optimizer) -> list[str]:
    """Why the saved optimizer state cannot go into `optimizer` (type, groups, each state tensor's shape)."""
    problems = []
    saved_class, this_class = meta.get("optimizer_class"), type(optimizer).__name__
    if saved_class is not None and saved_class != this_class:
        problems.append(f"optimizer: checkpoint {saved_class}, this run {this_class}")
    groups = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in opt_sd["param_groups"]]
    if groups != saved:
        problems.append(
            f"optimizer parameter groups: checkpoint sizes {saved}, this run {groups}; build the optimizer as "
            f"the saved run did"
        )
        return problems
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = [i for g in opt_sd["param_groups"] for i in g["params"]]  # saved ids, in the order of `params`
    by_id = {i: params[n] for n, i in enumerate(index)}
    for idx, entry in opt_sd["state"].items():
        p = by_id.get(idx)
        if p is None:
            problems.append(f"optimizer state for parameter {idx}, which no parameter group holds")
            continue
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                problems.append(
                    f"optimizer state {k} of parameter {idx}: shape {tuple(v.shape)}, the parameter is {tuple(p.shape)}"
                )
    return problems


def load_checkpoint(
    folder,
    nm: NeatModule,
    optimizer=None,
    scheduler=None,
    *,
    restore_rng: bool = True,
    expect: dict | None = None,
) -> dict:
    """Restore a run saved by `save_checkpoint` into `nm`, `optimizer`, `scheduler` (and the RNGs).
    Returns {"step": …, "extra": …, "path": …}. `expect`: values the saved `extra` must hold (e.g. this run's
    batch size and learning rate); a key the checkpoint did not record is not compared. Every check (model and
    adapter configuration, `expect`, the optimizer's type, groups and state shapes) runs before anything is
    changed; all differences are listed in one AdapterMismatchError. A damaged copy falls back to `<folder>.old`."""
    _check_module(nm, "load_checkpoint")
    found, meta, tensors = _read_first(Path(folder))
    want, have = meta["signature"], _signature(nm)
    differ = [k for k in want if want.get(k) != have.get(k)]
    diff = [f"{k}: checkpoint {want.get(k)!r}, this run {have.get(k)!r}" for k in differ]
    saved_extra = meta["extra"]
    diff += [
        f"{k}: checkpoint {saved_extra[k]!r}, this run {v!r}"
        for k, v in (expect or {}).items()
        if k in saved_extra and saved_extra[k] != v and k not in differ  # each difference listed once
    ]
    opt_sd = None
    if optimizer is not None:
        if meta["optimizer"] is None:
            diff.append("optimizer: the checkpoint holds no optimizer state")
        else:
            try:
                opt_sd = _join_optimizer(meta["optimizer"], tensors)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise AdapterMismatchError(
                    f"{found / STATE_JSON}: malformed optimizer state ({exc!r}); the checkpoint is damaged"
                ) from exc
            diff += _optimizer_problems(meta, opt_sd, optimizer)
    if diff:
        raise AdapterMismatchError(
            f"the checkpoint in {found} was made for another model or configuration; "
            f"nothing was restored:\n  - " + "\n  - ".join(diff)
        )
    load_adapters(nm, found / "adapters")  # checks sites, shapes and base-weight fingerprints before copying
    if opt_sd is not None:
        _shard_like_parameters(opt_sd, optimizer)
        optimizer.load_state_dict(opt_sd)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_from_json(meta["rng_python"]))
    return {"step": meta["step"], "extra": meta["extra"], "path": found}
