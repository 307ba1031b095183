"""`LoadedAdapters`: a checkpoint read into memory, in our terms, whatever format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import NeatConfig


@dataclass
class LoadedAdapters:
    """What `read_adapters(folder)` returns.

    config:    the NEAT options (patterns select exactly the saved sites).
    sites:     parameter name → {"A": (d_out, r), "B": (d_out, r), "encoders": [...], "decoders": [...]}.
    trainable: parameter name → tensor, for parameters trained in full (e.g. a new head).
    site_meta: parameter name → what our format records of the site (layout, aliases, base fingerprint, …);
               empty for PEFT checkpoints, which record none of it.
    format:    "neat" or "peft".
    base_model: the class name of the model the adapters were trained on, where recorded.
    """

    config: NeatConfig
    sites: dict[str, dict]
    trainable: dict[str, torch.Tensor]
    site_meta: dict[str, dict]
    format: str
    path: Path
    base_model: str | None = None
    extra: dict = field(default_factory=dict)
