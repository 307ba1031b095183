"""Atomic writes: every file neat_fx writes (adapters, checkpoints, ONNX models) is written under a temporary
name beside its destination, flushed, checked by its writer, then renamed into place; on failure the
temporaries are removed and the destination keeps its previous content. One helper for all writers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_beside(final: Path, suffix: str = ".tmp") -> Path:
    """A new empty file in `final`'s folder, named `.<final name>.<random><suffix>` (hidden, same file system)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    return Path(tmp)


def fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path):
    """Flush a new folder's files before a rename makes it current (a power loss must not leave a renamed
    folder of empty files)."""
    for p in root.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(root)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary beside it, flushed, then renamed: readers see the old file or
    the new one, never a part."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


class Staging:
    """Temporary files for a set of destinations, renamed into place together by `commit()`.

        with Staging() as st:
            tmp = st.path(folder / "weights.safetensors")
            ...write and check tmp...
            st.commit()          # flush, then rename each temporary onto its destination, in order
    Leaving the block without a commit (an exception) removes every temporary and changes no destination."""

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []
        self._optional: set[Path] = set()

    def path(self, final: Path, suffix: str = ".tmp") -> Path:
        tmp = temp_beside(Path(final), suffix)
        self._pending.append((tmp, Path(final)))
        return tmp

    def add(self, tmp: Path, final: Path | None, optional: bool = False):
        """A temporary named by someone else (e.g. a data file beside a temporary model) to rename at commit
        (`final` None: only removed on the way out). optional: skipped at commit if it was never written (or
        removed again)."""
        self._pending.append((Path(tmp), Path(final) if final is not None else None))
        if optional or final is None:
            self._optional.add(Path(tmp))

    def commit(self):
        self._pending = [(t, f) for t, f in self._pending if f is not None and (t.exists() or t not in self._optional)]
        for tmp, _ in self._pending:
            fsync_file(tmp)
        for tmp, final in self._pending:
            os.replace(tmp, final)
        for folder in {final.parent for _, final in self._pending}:
            fsync_dir(folder)
        self._pending = []

    def discard(self):
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._pending = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


@contextlib.contextmanager
def staged_folder(folder: Path, check=None):
    """Yield a new temporary folder beside `folder`; when the block succeeds (and `check(tmp)` passes, if given),
    swap it in. At every instant a complete copy exists at `folder` or, between the two renames, at
    `<folder>.old` (readers fall back to it: see `previous_copy`)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        if check is not None:
            check(tmp)
        fsync_tree(tmp)
        old = previous_copy(folder)
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)  # safe: `folder` is complete
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def previous_copy(folder: Path) -> Path:
    """Where `staged_folder` keeps the previous copy while it swaps the new one in."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".old")


def staged_temporaries(folder: Path) -> list[Path]:
    """Temporary folders `staged_folder(folder)` left beside `folder` when a kill stopped it (`.<name>.tmp-*`)."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return []
    return [p for p in folder.parent.glob(f".{glob_escape(folder.name)}.tmp-*") if p.is_dir()]


def file_temporaries(folder: Path, names) -> list[Path]:
    """Temporary files `temp_beside` left in `folder` for destinations named `names` (globs allowed) when a kill
    stopped their writer (`.<name>.<random>.tmp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for name in names:
        found += [p for p in folder.glob(f".{name}.*.tmp") if p.is_file()]
    return found


def remove_paths(paths):
    """Remove files and folders, ignoring ones already gone (sweeping the temporaries of earlier kills)."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
