"""Bytes of tensor storage alive, counted op by op: how much a forward pass keeps for the backward pass.

Device-independent (no allocator statistics on CPU): a dispatch mode notes the storage of every tensor an op
returns and a weak reference takes it off the count when the storage is freed. What is alive after the forward,
less the outputs, is what the autograd graph (and activation checkpointing's saved inputs) holds.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """with LiveTensorBytes() as live: ...; live.now / live.peak: bytes of storages created inside the block
    and still alive / at most alive at once."""

    def __init__(self):
        super().__init__()
        self.now = 0
        self.peak = 0
        self._alive: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # only storages the op allocated: a view, an in-place op or an op returning its input reuses an input's
        # storage (a transposed weight is the weight's memory, not the forward's)
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._note(storage)
        return out

    def _note(self, storage):
        key = storage._cdata
        if key in self._alive:
            return
        size = storage.nbytes()
        self._alive[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key):
        entry = self._alive.pop(key, None)
        if entry is not None:
            self.now -= entry[1]

    def bytes_of(self, *tensors) -> int:
        """Bytes of the distinct storages of `tensors` that this count holds."""
        seen = {}
        for t in pytree.tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st._cdata in self._alive:
                    seen[st._cdata] = st.nbytes()
        return sum(seen.values())
