"""`NeatConfig`: the options of one NEAT transform, validated in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

#: activations the adapter network may use (σ in DESIGN.md §2).
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "sin", "identity")
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


@dataclass
class NeatConfig:
    """Options of `neat_fx.transform`.

    patterns:   fnmatch globs or ``re:``-prefixed regexes on weight names (with and without ``.weight``).
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
        self.patterns = _as_tuple(self.patterns, "patterns")
        self.exclude = _as_tuple(self.exclude, "exclude")
        self.trainable = _as_tuple(self.trainable, "trainable")
        self.modes = _as_tuple(self.modes, "modes")
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
            self.scale = float(self.scale)
        except (TypeError, ValueError):
            raise ConfigError(f"scale must be a number, got {self.scale!r}") from None
        if self.capture not in CAPTURE_METHODS:
            raise ConfigError(f"capture must be one of {', '.join(CAPTURE_METHODS)}; got {self.capture!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ConfigError(f"modes must be a non-empty subset of {MODES}; got {self.modes!r}")
        if self.adapter_dtype not in (None, "float32", "float64", "bfloat16", "float16"):
            raise ConfigError(
                f"adapter_dtype must be None, 'float32', 'float64', 'bfloat16' or 'float16'; got {self.adapter_dtype!r}"
            )

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
    def from_dict(cls, d: dict) -> "NeatConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

