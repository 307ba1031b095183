"""Writing a checkpoint's two files (tensors + JSON config) so that a kill at any instant leaves exactly the
previous save or exactly the new one, gathering sharded tensors first.

Two schemes, one per format (`write_committed`, `write_swapped`):

* ours (`neat_config.json` names its weights file and their sha256): the weights are written first under a
  content-addressed name beside the fixed one (`adapters-<sha12>.safetensors`), flushed; then the config is
  replaced — the one commit point; then the weights are renamed onto the fixed name. A reader whose config's
  checksum does not match the fixed name takes the content-addressed file (`committed_weights`). Other files
  in the folder are never touched.
* PEFT's (fixed names PEFT itself reads, no checksum): the pair is written into a new sibling folder and
  swapped in (`neat_fx.atomic.staged_folder`); between the two renames readers fall back to `<folder>.old`.
  A folder holding files other than the pair is refused rather than replaced.

Temporaries a kill left (hidden `.<name>.*.tmp` files, content-addressed weights the config does not name,
`.<folder>.tmp-*` folders) are swept at the next save."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import (
    Staging,
    file_temporaries,
    fsync_dir,
    fsync_file,
    previous_copy,
    remove_paths,
    sha256_file,
    staged_folder,
    staged_temporaries,
)
from ..distributed import full_tensor, is_sharded
from ..errors import AdapterMismatchError


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


def content_name(weights_name: str, sha: str) -> str:
    """`adapters.safetensors` → `adapters-<first 12 hex digits of sha>.safetensors`."""
    p = Path(weights_name)
    return f"{p.stem}-{sha[:12]}{p.suffix}"


def _content_glob(weights_name: str) -> re.Pattern:
    p = Path(weights_name)
    return re.compile(re.escape(p.stem) + r"-[0-9a-f]{12}" + re.escape(p.suffix))


def _gathered(tensors: dict, make_config, write):
    """Gather sharded (FSDP2) tensors — a collective, so every rank calls this — then `write(tensors)` on rank 0
    alone; the others return once the files are in place."""
    sharded = any(is_sharded(v) for v in tensors.values())
    tensors = {k: full_tensor(v).detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not sharded:
        write(tensors)
        return
    import torch.distributed as dist

    if dist.get_rank() != 0:
        make_config("")  # the same collectives as rank 0's (fingerprints of sharded base weights)
        dist.barrier()
        return
    try:
        write(tensors)
    finally:
        dist.barrier()


def _save_checked(tensors: dict, path: Path, metadata: dict[str, str] | None = None):
    save_file(tensors, str(path), metadata=metadata)
    if not same_tensors(load_file(str(path)), tensors):
        raise OSError(f"verification of {path} failed: what was read back differs from what was written")


def _dump(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=False) + "\n"


# -- ours: content-addressed weights, the config as the one commit point ----------------------------------
def write_committed(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    """Write `tensors` and `make_config(sha256)` to `folder` (ours: see the module docstring)."""
    _gathered(tensors, make_config, lambda t: _write_committed(folder, weights_name, t, config_name, make_config))


def committed_sha(folder: Path, config_name: str) -> str | None:
    """The weights checksum the current config of `folder` names, or None (no config, or unreadable)."""
    try:
        meta = json.loads((folder / config_name).read_text())
        sha = meta["weights"]["sha256"]
    except Exception:
        return None
    return sha if isinstance(sha, str) else None


def sweep_committed(folder: Path, weights_name: str, config_name: str):
    """Remove what earlier kills left in `folder`: hidden temporaries of our files, content-addressed weights the
    current config does not name, and `.<folder>.tmp-*` folders of an interrupted PEFT save."""
    sha = committed_sha(folder, config_name)
    keep = content_name(weights_name, sha) if sha else None
    rx = _content_glob(weights_name)
    p = Path(weights_name)
    stale = file_temporaries(folder, [config_name, weights_name, f"{p.stem}-*{p.suffix}"])
    if folder.is_dir():
        stale += [p for p in folder.iterdir() if rx.fullmatch(p.name) and p.name != keep and p.is_file()]
    stale += staged_temporaries(folder)
    remove_paths(stale)


def _write_committed(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config):
    folder.mkdir(parents=True, exist_ok=True)
    sweep_committed(folder, weights_name, config_name)
    with Staging() as st:
        w_tmp = st.path(folder / weights_name)
        _save_checked(tensors, w_tmp)
        sha = sha256_file(w_tmp)
        c_tmp = st.path(folder / config_name)
        c_tmp.write_text(_dump(make_config(sha)))
        fsync_file(w_tmp)
        fsync_file(c_tmp)
        addressed = folder / content_name(weights_name, sha)
        named_now = committed_sha(folder, config_name) == sha
        os.replace(w_tmp, addressed)  # 1: new weights beside the old ones, named by the config to come
        try:
            fsync_dir(folder)
            os.replace(c_tmp, folder / config_name)  # 2: the commit point
        except BaseException:
            if not named_now:
                remove_paths([addressed])
            raise
        fsync_dir(folder)
        st.discard()
    os.replace(addressed, folder / weights_name)  # 3: the fixed name again (readers accept both, see read)
    fsync_dir(folder)
    rx = _content_glob(weights_name)
    remove_paths(p for p in folder.iterdir() if rx.fullmatch(p.name) and p.is_file())  # the previous config's
    old = previous_copy(folder)
    if old.is_dir() and _only(old, {"adapter_config.json", "adapter_model.safetensors"}):
        remove_paths([old])  # the previous copy of an interrupted PEFT save, superseded


def committed_weights(folder: Path, weights_name: str, sha: str) -> tuple[Path, bytes] | None:
    """The weights file (and its bytes) whose sha256 is `sha`: `weights_name` or, after a kill between the
    commit and the last rename, its content-addressed name. None when neither matches."""
    import hashlib

    fixed, addressed = folder / weights_name, folder / content_name(weights_name, sha)
    for path in (fixed, addressed, fixed):  # fixed again: the last rename may have happened while we looked
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if hashlib.sha256(data).hexdigest() == sha:
            return path, data
    return None


# -- PEFT's: a new folder swapped in ---------------------------------------------------------------------
def write_swapped(
    folder: Path, weights_name: str, tensors: dict, config_name: str, make_config, metadata: dict | None = None
):
    """Write the pair into a new sibling folder and swap it in (see the module docstring). `metadata`: strings
    stored in the safetensors header (readers that do not know them ignore them)."""
    _gathered(
        tensors, make_config, lambda t: _write_swapped(folder, weights_name, t, config_name, make_config, metadata)
    )


def _only(folder: Path, names: set) -> bool:
    return all(p.name in names for p in folder.iterdir())


def _write_swapped(folder: Path, weights_name: str, tensors: dict, config_name: str, make_config, metadata=None):
    ours = {weights_name, config_name}
    if folder.is_dir():
        remove_paths(file_temporaries(folder, ours))
        others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
        if others:
            raise AdapterMismatchError(
                f"{folder} holds files other than a PEFT adapter ({', '.join(others[:5])}"
                f"{', …' if len(others) > 5 else ''}); format='peft' replaces the whole folder in one atomic "
                f"step and will not delete them: move them elsewhere, or save to a new folder"
            )
    remove_paths(staged_temporaries(folder))
    if folder.is_dir():
        mode = folder.stat().st_mode & 0o7777
    else:
        umask = os.umask(0o022)
        os.umask(umask)
        mode = 0o777 & ~umask
    with staged_folder(folder) as tmp:
        os.chmod(tmp, mode)  # mkdtemp's 0700 would make the swapped-in folder private
        _save_checked(tensors, tmp / weights_name, metadata)
        (tmp / config_name).write_text(_dump(make_config(sha256_file(tmp / weights_name))))


def read_json(path: Path, what: str) -> dict:
    """`path` parsed as a JSON object, or AdapterMismatchError naming the file and what was expected."""
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterMismatchError(
            f"{path} is not valid JSON ({exc}); expected {what} — the file is truncated or was edited by hand: "
            f"save again"
        ) from None
    if not isinstance(meta, dict):
        raise AdapterMismatchError(f"{path} holds a JSON {type(meta).__name__}; expected {what} (a JSON object)")
    return meta


def load_tensors(path: Path, data: bytes | None = None) -> dict:
    """The tensors of a safetensors file (or of its bytes, read once and checked), or AdapterMismatchError."""
    from safetensors.torch import load

    try:
        return load(data) if data is not None else load_file(str(path))
    except Exception as exc:  # SafetensorError and friends: a truncated or foreign file
        raise AdapterMismatchError(
            f"{path} is not a valid safetensors file ({type(exc).__name__}: {exc}); expected the tensors "
            f"save_adapters wrote — the file is truncated or corrupt: save again"
        ) from None
