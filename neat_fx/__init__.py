"""neat_fx — NEAT (nonlinear parameter-efficient fine-tuning) for any PyTorch model, as a compiler pass.

    nm = neat_fx.transform(model, ["*query", "*value"], example_inputs=batch, rank=8)
    ...train nm...
    neat_fx.save_adapters(nm, "adapters/")
    folded = neat_fx.fold(nm)          # plain graph, W0 + ΔW as constants
    neat_fx.merge_into(model, nm)      # or write W0 + ΔW into the model in place
    torch.compile(nm, backend="neat")  # NEAT-aware lowering, then Inductor
"""
from .config import ACTIVATIONS, NeatConfig
from .errors import (
    AdapterMismatchError,
    CaptureError,
    ConfigError,
    InputMismatchError,
    MergeError,
    NeatError,
    PatternError,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .compiler import backend
from .fold import FoldedModule, fold, merge_into
from .io import load_adapters, save_adapters
from .neat_module import NeatModule, SiteInfo
from .transform import transform

__version__ = "0.1.0"


def sites(nm: NeatModule) -> list[SiteInfo]:
    """The adapted sites of `nm`: name, op kinds, d_in, d_out, layout, uses."""
    return nm.sites()


__all__ = [
    "ACTIVATIONS", "AdapterMismatchError", "CaptureError", "ConfigError", "FoldedModule", "InputMismatchError",
    "MergeError", "NeatConfig", "backend", "load_checkpoint", "save_checkpoint", "NeatError", "NeatModule", "PatternError", "SiteInfo", "fold",
    "load_adapters", "merge_into", "save_adapters", "sites", "transform", "__version__",
]
