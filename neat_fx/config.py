"""`NeatConfig`: the options of one NEAT transform, validated in one place. Frozen: derive a changed copy
with `dataclasses.replace(config, rank=16)` (which validates again)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .activations import ACTIVATIONS
from .errors import ConfigError

#: adapter_dtype names and the dtypes they stand for.
ADAPTER_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
CAPTURE_METHODS = ("export", "fx")
MODES = ("train", "eval")


def _as_tuple(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(f"{what} must be a string or a list of strings, got {type(value).__name__}") from None
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} must hold strings, got {item!r} ({type(item).__name__})")
    return items


@dataclass(frozen=True)
class NeatConfig:
    """Options of `neat_fx.transform`.

    patterns:   fnmatch globs or ``re:``-prefixed regexes on weight names (with and without ``.weight``), or
                ``"all-linear"``: every linear-like weight except the output head (PEFT's meaning).
    rank:       r, the width of the adapter network.
    depth:      2 (A and B only) or an even number > 2: (depth-2) extra r×r layers with mirrored residuals.
    activation: σ, one of ACTIVATIONS.
    scale:      s in ``y' = y + s·(x H) Bᵀ``.
    exclude:    patterns removed from the selection.
    trainable:  patterns of base parameters trained in full (e.g. a new classification head).
    adapter_dtype: dtype of the adapter parameters; None keeps float32 (also for half-precision bases).
    """

    patterns: tuple[str, ...] = ()
    rank: int = 8
    depth: int = 2
    activation: str = "relu"
    scale: float = 1.0
    exclude: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    adapter_dtype: str | None = None
    capture: str = "export"
    modes: tuple[str, ...] = MODES
    seed: int | None = None

    def __post_init__(self):
        # Normalised in place once, before anyone sees the object (frozen: object.__setattr__).
        for name in ("patterns", "exclude", "trainable", "modes"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 2 or self.depth % 2:
            raise ConfigError(
                f"depth must be an even integer ≥ 2 (2 = A and B only; 4 adds one r×r encoder and decoder), "
                f"got {self.depth!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise ConfigError(f"scale must be a number, got {self.scale!r}") from None
        if not math.isfinite(scale):
            raise ConfigError(f"scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if self.capture not in CAPTURE_METHODS:
            raise ConfigError(f"capture must be one of {', '.join(CAPTURE_METHODS)}; got {self.capture!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"modes must be a non-empty subset of {MODES}; got {self.modes!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(
                f"adapter_dtype must be None or one of {', '.join(map(repr, ADAPTER_DTYPES))}; "
                f"got {self.adapter_dtype!r}"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' dtype: adapter_dtype, float32 when None (also for half-precision bases)."""
        return ADAPTER_DTYPES[self.adapter_dtype] if self.adapter_dtype else torch.float32

    @property
    def hidden_layers(self) -> int:
        """Number of r×r encoder layers (and as many decoders): (depth - 2) / 2."""
        return (self.depth - 2) // 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("patterns", "exclude", "trainable", "modes"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NeatConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
