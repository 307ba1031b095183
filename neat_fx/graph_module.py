"""`GraphContainer`: an nn.Module that runs one captured graph per mode ("train" / "eval").

The graphs are `fx.GraphModule`s kept outside the module tree; their top-level attributes are the
container's own submodules (the user's model, the adapters, …), so parameters are shared, not copied,
and `state_dict` / `parameters()` list each tensor once. `.train()` / `.eval()` pick the graph.

Captured graphs hard-code the device of the example inputs (`arange(device=cpu)`, metadata asserts),
so before each call the container checks where its weights live and rewrites those constants if the
module has moved. A dtype change after capture is refused: the graph's casts were traced for the old
dtype (an explicit float32 upcast cannot be told from an incidental one).
"""
from __future__ import annotations

import inspect

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, InputMismatchError


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    ia = a.index if a.index is not None else 0
    ib = b.index if b.index is not None else 0
    return ia == ib


def retarget_devices(graph: fx.Graph, old: torch.device, new: torch.device) -> int:
    """Replace every torch.device constant equal to `old` in the graph's node arguments by `new`."""
    changed = 0

    def swap(v):
        nonlocal changed
        if isinstance(v, torch.device) and _same_device(v, old):
            changed += 1
            return new
        return v

    for node in graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            node.args = pytree.tree_map(swap, node.args)
            node.kwargs = pytree.tree_map(swap, node.kwargs)
    return changed


class GraphContainer(nn.Module):
    """Runs `self._graphs[mode]` for the current mode. Subclasses register the state the graphs use."""

    # transformers.Trainer passes `num_items_in_batch` to any forward with **kwargs unless told otherwise;
    # a captured graph takes exactly the example inputs' arguments.
    accepts_loss_kwargs = False

    def __init__(self):
        super().__init__()
        # Plain attributes (not submodules): the graphs share the container's children.
        object.__setattr__(self, "_graphs", {})
        object.__setattr__(self, "_signatures", {})
        object.__setattr__(self, "_reference_name", None)  # a base weight, to see device / dtype moves
        object.__setattr__(self, "_graph_device", None)
        object.__setattr__(self, "_graph_dtype", None)

    # -- building -------------------------------------------------------------------------------
    def _set_graph(self, mode: str, graph: fx.Graph) -> fx.GraphModule:
        gm = fx.GraphModule(self, graph)
        # GraphModule copies attribute paths into fresh containers; point its top-level names at ours.
        for name in list(gm._modules):
            if name in self._modules:
                gm._modules[name] = self._modules[name]
        self._graphs[mode] = gm
        self._signatures[mode] = inspect.signature(gm.forward)
        return gm

    def _set_reference(self, name: str | None):
        """Name (in this module) of a floating-point base tensor whose device/dtype the graphs follow.
        Kept as a name: `.to()` may replace the tensor object (e.g. to or from "meta")."""
        object.__setattr__(self, "_reference_name", name)
        tensor = self._reference
        if tensor is not None:
            object.__setattr__(self, "_graph_device", tensor.device)
            object.__setattr__(self, "_graph_dtype", tensor.dtype)

    def graph(self, mode: str | None = None) -> fx.Graph:
        """The captured graph of `mode` (default: the current one)."""
        return self._graph_module(mode).graph

    def graph_module(self, mode: str | None = None) -> fx.GraphModule:
        return self._graph_module(mode)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self._graphs)

    def _graph_module(self, mode: str | None = None) -> fx.GraphModule:
        mode = mode or ("train" if self.training else "eval")
        try:
            return self._graphs[mode]
        except KeyError:
            raise ConfigError(
                f"{type(self).__name__} holds graphs for modes {list(self._graphs)}, not {mode!r}; "
                f"transform with modes=('train', 'eval') to switch between training and evaluation"
            ) from None

    @property
    def _reference(self) -> torch.Tensor | None:
        name = self._reference_name
        if name is None:
            return None
        mod_name, _, field = name.rpartition(".")
        mod = self.get_submodule(mod_name) if mod_name else self
        return getattr(mod, field)

    # -- running --------------------------------------------------------------------------------
    def _sync_device(self):
        ref = self._reference
        if ref is None:
            return
        if ref.dtype != self._graph_dtype:
            raise ConfigError(
                f"the base weights changed dtype from {self._graph_dtype} to {ref.dtype} after capture; the "
                f"captured graph's casts were traced for {self._graph_dtype}. Convert the model's dtype first, "
                f"then call neat_fx.transform (adapters themselves stay float32 unless adapter_dtype says otherwise)."
            )
        if ref.device != self._graph_device:
            for gm in self._graphs.values():
                retarget_devices(gm.graph, self._graph_device, ref.device)
                gm.recompile()
            object.__setattr__(self, "_graph_device", ref.device)

    def _apply(self, fn, recurse=True):
        ref = self._reference
        if ref is not None and ref.is_floating_point():
            probe = fn(torch.empty(0, dtype=ref.dtype, device=ref.device))
            if isinstance(probe, torch.Tensor) and probe.dtype != ref.dtype:
                raise ConfigError(
                    f"{type(self).__name__} cannot change dtype after capture ({ref.dtype} → {probe.dtype}): "
                    f"the captured graph's casts were traced for {ref.dtype}. Convert the model first, then "
                    f"transform it. Moving between devices with .to(device) is supported."
                )
        result = super()._apply(fn, recurse)
        self._sync_device()
        return result

    def forward(self, *args, **kwargs):
        mode = "train" if self.training else "eval"
        gm = self._graph_module(mode)
        try:
            self._signatures[mode].bind(*args, **kwargs)
        except TypeError as exc:
            expected = ", ".join(self._signatures[mode].parameters)
            raise InputMismatchError(
                f"{type(self).__name__} was captured with inputs ({expected}) and cannot take this call "
                f"({exc}). Call it with the same argument structure as example_inputs, or transform again with "
                f"example inputs that include every argument you pass (e.g. labels=…)."
            ) from None
        self._sync_device()
        return gm(*args, **kwargs)
