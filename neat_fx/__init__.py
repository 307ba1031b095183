"""neat_fx — NEAT (nonlinear parameter-efficient fine-tuning) for any PyTorch model, as a compiler pass.

    nm = neat_fx.transform(model, ["*query", "*value"], example_inputs=batch, rank=8)
    ...train nm...
    neat_fx.save_adapters(nm, "adapters/")
    folded = neat_fx.fold(nm)          # plain graph, W0 + ΔW as constants
    neat_fx.merge_into(model, nm)      # or write W0 + ΔW into the model in place
    torch.compile(nm, backend="neat")  # NEAT-aware lowering, then Inductor
    neat_fx.generate(nm, input_ids, max_new_tokens=32)  # a decoder LM: its own generate(), KV cache, W0 + ΔW

The stages and how they fit: docs/design.md.
"""

from . import eager  # noqa: F401  (registers the base-model path of NeatModule.disable_adapters)
from ._version import __version__
from .activations import ACTIVATIONS
from .checkpoint import load_checkpoint, save_checkpoint
from .compiler import backend
from .config import NeatConfig
from .containers import FoldedModule, NeatModule, SiteInfo
from .errors import (
    AdapterMismatchError,
    CaptureError,
    ConfigError,
    DeviceError,
    GenerationError,
    InputMismatchError,
    MergeError,
    NeatError,
    PatternError,
)
from .fold import fold, merge_into
from .generate import generate
from .io import LoadedAdapters, load_adapters, read_adapters, save_adapters
from .serving import AdapterBank, serve
from .transform import transform


def sites(nm: NeatModule) -> list[SiteInfo]:
    """The adapted sites of `nm`: name, op kinds, d_in, d_out, layout, uses."""
    return nm.sites()


def blocks(nm: NeatModule) -> list[str]:
    """The model's blocks that `nm` runs as units (its transformer layers), by the model's names."""
    if not isinstance(nm, NeatModule):
        raise ConfigError(f"blocks takes a NeatModule (what neat_fx.transform returns), got {type(nm).__name__}")
    return nm.blocks()


def submodule(nm: NeatModule, name: str):
    """The module of block `name` ("model.layers.3") that `nm` runs as a unit: the model's own layer, whose
    forward hooks run around that block's captured graph — what `fully_shard` and composable checkpointing
    take: `for b in neat_fx.blocks(nm): fully_shard(neat_fx.submodule(nm, b))`, then `fully_shard(nm)`."""
    if not isinstance(nm, NeatModule):
        raise ConfigError(f"submodule takes a NeatModule (what neat_fx.transform returns), got {type(nm).__name__}")
    return nm.block_module(name)


__all__ = [
    "ACTIVATIONS",
    "AdapterBank",
    "AdapterMismatchError",
    "CaptureError",
    "ConfigError",
    "DeviceError",
    "FoldedModule",
    "GenerationError",
    "InputMismatchError",
    "LoadedAdapters",
    "MergeError",
    "NeatConfig",
    "NeatError",
    "NeatModule",
    "PatternError",
    "SiteInfo",
    "__version__",
    "backend",
    "blocks",
    "fold",
    "generate",
    "load_adapters",
    "load_checkpoint",
    "merge_into",
    "read_adapters",
    "save_adapters",
    "save_checkpoint",
    "serve",
    "sites",
    "submodule",
    "transform",
]

#: documented submodules that need an extra (or transformers), imported on first attribute access so that
#: `import neat_fx` stays light: `neat_fx.export.to_onnx(...)`, `neat_fx.hf.NeatAdaptersCallback()`.
_LAZY_SUBMODULES = ("card", "export", "hf")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'neat_fx' has no attribute {name!r}")
