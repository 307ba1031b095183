"""Inputs for verification (another batch of the example's structure) and names for the outputs. The comparison
itself is neat_fx.numerics.compare, shared with the capture check."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .. import capture as cap


def other_batch(args: tuple, kwargs: dict, dynamic_axes: dict[tuple, str]):
    """Example inputs resized along their dynamic axes: a batch of another batch size and length.

    `dynamic_axes` maps (leaf index, axis) → symbol; one symbol gets one new size everywhere. Growing repeats
    the first slice along the axis, shrinking drops the last one, so token ids and masks stay valid.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sizes: dict[str, int] = {}
    for (i, axis), sym in dynamic_axes.items():
        if sym in sizes:
            continue
        n = leaves[i].shape[axis]
        sizes[sym] = n + 1 if axis == 0 or n <= 2 else n - 1
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            for (j, axis), sym in dynamic_axes.items():
                if j != i:
                    continue
                want = sizes[sym]
                have = leaf.shape[axis]
                if want < have:
                    leaf = leaf.narrow(axis, 0, want)
                elif want > have:
                    leaf = torch.cat([leaf, leaf.narrow(axis, 0, want - have)], dim=axis)
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def output_names(out) -> list[str]:
    """Names for the flattened outputs, from their key paths: 'logits' for ModelOutput and dataclass fields and dict
    keys, 'output_0' for positions (also the children of output classes registered without key paths)."""
    names, seen = [], set()
    for i, (path, leaf) in enumerate(cap.leaves_with_path(out)):
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        name = "_".join(p for p in parts if p) or f"output_{i}"
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
        if not name[0].isalpha():
            name = "output_" + name
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names
