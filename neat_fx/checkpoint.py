"""Crash-safe training checkpoints: adapters, optimizer, scheduler, RNG state and step, written atomically.

    save_checkpoint(folder, nm, opt, sched, step=step)      # every N steps
    state = load_checkpoint(folder, nm, opt, sched)         # after a crash: state["step"] steps were done

A checkpoint is a folder: `adapters/` (the `save_adapters` format), `trainer_state.safetensors` (optimizer
tensors, torch RNG) and `trainer_state.json` (step, optimizer hyper-parameters, scheduler, Python RNG, and
what it was made for). It is written whole under a temporary name, read back, then swapped in with renames
(neat_fx.atomic.staged_folder): a kill at any moment leaves the previous checkpoint or the new one, never a
mix (a kill between the two renames leaves `<folder>.old`, which `load_checkpoint` falls back to). JSON and
safetensors only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import previous_copy, staged_folder
from .containers import NeatModule
from .distributed import any_sharded
from .errors import AdapterMismatchError
from .io import load_adapters, save_adapters

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
    if any_sharded(nm):
        raise NotImplementedError(
            "save_checkpoint: nm is sharded (FSDP2); its optimizer state is sharded too. Checkpoint a sharded run "
            "with torch.distributed.checkpoint (dcp.save of model and optimizer state dicts), and save the adapters "
            "with neat_fx.save_adapters on every rank."
        )
    folder = Path(folder)
    with staged_folder(folder, check=_read) as tmp:  # _read: read back before it replaces anything
        save_adapters(nm, tmp / "adapters")
        tensors, opt_meta = _split_optimizer(optimizer.state_dict()) if optimizer is not None else ({}, None)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "format": FORMAT,
            "step": int(step),
            "signature": _signature(nm),
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_python": _to_json(random.getstate()),
            "extra": extra or {},
        }
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta))
    return folder


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


def _read(folder: Path):
    meta = json.loads((folder / STATE_JSON).read_text())
    if meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{folder / STATE_JSON} is not a neat_fx checkpoint")
    return meta, load_file(str(folder / STATE_TENSORS))


def find_checkpoint(folder) -> Path | None:
    """`folder` if it holds a checkpoint, else the `.old` one a kill between two renames left, else None."""
    folder = Path(folder)
    for f in (folder, previous_copy(folder)):
        if (f / STATE_JSON).exists():
            return f
    return None


def load_checkpoint(folder, nm: NeatModule, optimizer=None, scheduler=None, *, restore_rng: bool = True) -> dict:
    """Restore a run saved by `save_checkpoint` into `nm`, `optimizer`, `scheduler` (and the RNGs).
    Returns {"step": …, "extra": …}. Every check runs before anything is changed."""
    _check_module(nm, "load_checkpoint")
    found = find_checkpoint(folder)
    if found is None:
        raise FileNotFoundError(f"no neat_fx checkpoint in {folder} (expected {STATE_JSON}); start without resuming")
    meta, tensors = _read(found)
    want, have = meta["signature"], _signature(nm)
    if want != have:
        diff = [
            f"{k}: checkpoint {want.get(k)!r}, this run {have.get(k)!r}" for k in want if want.get(k) != have.get(k)
        ]
        raise AdapterMismatchError(
            f"the checkpoint in {found} was made for another model or configuration; "
            f"nothing was restored:\n  - " + "\n  - ".join(diff)
        )
    opt_sd = None
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise AdapterMismatchError(f"the checkpoint in {found} holds no optimizer state")
        opt_sd = _join_optimizer(meta["optimizer"], tensors)
        groups = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
        saved = [len(g["params"]) for g in opt_sd["param_groups"]]
        if groups != saved:
            raise AdapterMismatchError(
                f"the checkpoint's optimizer has parameter groups of sizes {saved}, this "
                f"optimizer {groups}; build the optimizer as the saved run did"
            )
    load_adapters(nm, found / "adapters")  # checks sites, shapes and base-weight fingerprints before copying
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate(_from_json(meta["rng_python"]))
    return {"step": meta["step"], "extra": meta["extra"], "path": found}
