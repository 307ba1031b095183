"""The activations σ the adapter network may use: one registry with the function and the names Hugging Face
PEFT's PEANuT uses for each (transformers' ACT2FN names), for reading and writing its checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    peft_name: str | None  # what a PEFT checkpoint calls it (None: PEFT has no such activation)
    peft_aliases: tuple[str, ...] = ()  # other PEFT names that mean the same function


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", torch.relu, "relu"),
        Activation("gelu", nn.functional.gelu, "gelu"),
        Activation("silu", nn.functional.silu, "silu", ("swish",)),
        Activation("tanh", torch.tanh, "tanh"),
        Activation("sin", torch.sin, None),
        Activation("identity", _identity, "linear"),
    )
}

#: the names `NeatConfig.activation` accepts.
ACTIVATIONS = tuple(REGISTRY)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return REGISTRY[name].fn
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}") from None


def to_peft(name: str) -> str | None:
    """PEFT's name for activation `name`, or None where PEFT has none."""
    return REGISTRY[name].peft_name


def from_peft(peft_name: str) -> str | None:
    """Our name for PEFT's activation `peft_name`, or None where we have none."""
    for a in REGISTRY.values():
        if peft_name == a.peft_name or peft_name in a.peft_aliases:
            return a.name
    return None


def peft_names() -> list[str]:
    return sorted(n for a in REGISTRY.values() for n in (a.peft_name, *a.peft_aliases) if n)
