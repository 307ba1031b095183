"""`NeatModule`: the user's model run through captured graphs with NEAT adapters inserted."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import NeatConfig
from .graph_module import GraphContainer


@dataclass(frozen=True)
class SiteInfo:
    """One adapted weight, as `neat_fx.sites(nm)` reports it."""

    name: str  # qualified parameter name in the model
    key: str  # key of its adapter in nm.adapters
    kinds: str  # ops that use it: linear, matmul, mm, addmm
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, x @ W)
    d_in: int
    d_out: int
    uses: int  # op nodes using it, over all modes' graphs (tied weights: several)
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    shared_with_other_ops: bool  # also used outside linear ops (e.g. an embedding tied to the head)


def adapter_key(name: str) -> str:
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return stem.replace(".", "__")


class NeatModule(GraphContainer):
    """Created by `neat_fx.transform`. Called like the model; returns what the model returns.

    Children: `model` (the user's model, frozen, shared), `adapters` (one NeatAdapter per site),
    `trainable` (copies of base parameters trained in full), `extras` (constants of the capture),
    `base_weights` (W0 kept after `merge_into` wrote W0 + ΔW into the model).
    """

    def __init__(self, model: nn.Module, config: NeatConfig):
        super().__init__()
        self.model = model
        self.adapters = nn.ModuleDict()
        self.trainable = nn.ParameterDict()
        self.extras = nn.Module()
        self.base_weights = nn.Module()
        self.config = config
        self.site_infos: list[SiteInfo] = []
        self.trainable_names: dict[str, str] = {}  # key in self.trainable -> model parameter name

    # -- introspection ----------------------------------------------------------------------------
    def sites(self) -> list[SiteInfo]:
        return list(self.site_infos)

    def weight_of(self, site: SiteInfo) -> torch.Tensor:
        """W0 of a site: the base weight this module computes ΔW from."""
        if site.key in self.base_weights._buffers:
            return self.base_weights._buffers[site.key]
        return self.model.get_parameter(site.name)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Hugging Face's `PreTrainedModel.num_parameters` contract (the Trainer calls it): an int. Embeddings
        are the weights of nn.Embedding modules of the model."""
        trainable, total = self.parameter_counts()
        if only_trainable:
            return trainable
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in self.model.modules() if isinstance(m, nn.Embedding))
        return total

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total): total = the model's parameters + the adapters' (a trained-in-full copy
        replaces its original, so it is not counted twice)."""
        model_total = sum(p.numel() for p in self.model.parameters())
        adapters = sum(p.numel() for p in self.adapters.parameters())
        full = sum(p.numel() for p in self.trainable.parameters() if p.requires_grad)
        trainable = full + sum(p.numel() for p in self.adapters.parameters() if p.requires_grad)
        return trainable, model_total + adapters

    def summary(self) -> str:
        rows = [("site", "ops", "d_in", "d_out", "adapter params")]
        for s in self.site_infos:
            n = self.adapters[s.key].num_parameters()
            rows.append((s.name + (f" (×{s.uses})" if s.uses > len(self.modes) else ""), s.kinds, str(s.d_in), str(s.d_out), f"{n:,}"))
        for key, name in self.trainable_names.items():
            p = self.trainable[key]
            rows.append((name, "trained in full", "", "", f"{p.numel():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 or j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        trainable, total = self.parameter_counts()
        c = self.config
        lines.append("")
        lines.append(
            f"NEAT rank={c.rank} depth={c.depth} activation={c.activation} scale={c.scale:g} · "
            f"{len(self.site_infos)} sites · modes {', '.join(self.modes)}"
        )
        lines.append(f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f} %)")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        t, n = self.parameter_counts()
        return f"sites={len(self.site_infos)}, trainable={t:,}, total={n:,}"
