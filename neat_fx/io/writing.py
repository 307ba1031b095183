"""Writing a checkpoint's two files (tensors + JSON config) atomically, gathering sharded tensors first."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import Staging, sha256_file
from ..distributed import full_tensor, is_sharded


def same_tensors(a: dict, b: dict) -> bool:
    """Bitwise equality of two tensor dicts (NaN equals NaN at the same bits, unlike torch.equal)."""
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.numel() and not torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)):
            return False
    return True


def write_pair(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    """Write `tensors` to `folder/weights_name` and `make_config(sha256 of the weights)` to `folder/config_name`.

    Sharded (FSDP2) tensors are gathered first — a collective, so every rank calls this — and rank 0 alone
    writes; the others return once the files are in place."""
    sharded = any(is_sharded(v) for v in tensors.values())
    tensors = {k: full_tensor(v).detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not sharded:
        _write_files(folder, weights_name, tensors, config_name, make_config)
        return
    import torch.distributed as dist

    if dist.get_rank() != 0:
        make_config("")  # the same collectives as rank 0's (fingerprints of sharded base weights)
        dist.barrier()
        return
    try:
        _write_files(folder, weights_name, tensors, config_name, make_config)
    finally:
        dist.barrier()


def _write_files(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    folder.mkdir(parents=True, exist_ok=True)
    with Staging() as st:
        w_tmp = st.path(folder / weights_name)
        c_tmp = st.path(folder / config_name)
        save_file(tensors, str(w_tmp))
        if not same_tensors(load_file(str(w_tmp)), tensors):
            raise OSError(f"verification of {w_tmp} failed: what was read back differs from what was written")
        c_tmp.write_text(json.dumps(make_config(sha256_file(w_tmp)), indent=2, sort_keys=False) + "\n")
        st.commit()
