"""`ExportConfig`: every option of `to_onnx`, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

from neat_fx.errors import ConfigError

DTYPES = ("fp32", "fp16")
OPTIMIZE = ("auto", "fusions", "exporter", "none")
DEVICES = ("cpu", "cuda", "auto")
QUANTIZE = (None, "int8", "int4")
#: block sizes ONNX Runtime's MatMulNBits kernels take
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: task= of the neat_fx route (via="optimum" passes any Optimum task through)
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
ROUTES = ("neat_fx", "optimum", "genai")
OPTIMUM_LEVELS = (None, "O1", "O2", "O3", "O4")
#: logits= of the with-past task: the last position only (what generation reads) or every position (scoring)
LOGITS = ("last", "all")
#: attention= of the with-past task: GroupQueryAttention where the layer's class is known, or the model's own code
ATTENTION = ("auto", "model")


def _choice(name: str, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class ExportConfig:
    """The options of `to_onnx` (documented there)."""

    dtype: str = "fp32"
    optimize: str = "auto"
    dynamic: object = True  # True (batch, sequence), "all", False, or a torch.export dynamic_shapes spec
    opset: int | None = None
    verify: bool = True
    device: str = "cpu"
    approximate: bool = False
    verify_inputs: object = None  # None or a list of example inputs
    quantize: str | None = None
    block_size: int = 32  # int4 only
    quantize_embedding: bool = True  # int4, neat_fx route only
    via: str = "neat_fx"
    optimum_level: str | None = "O2"
    task: str | None = None
    adapters: object = None  # None, or saved adapter folders: {name: folder} or a list (via="genai": NeatModules too)
    logits: str = "last"  # task="text-generation-with-past" only
    attention: str = "auto"  # task="text-generation-with-past" only

    def __post_init__(self):
        _choice("dtype", self.dtype, DTYPES)
        _choice("optimize", self.optimize, OPTIMIZE)
        _choice("device", self.device, DEVICES)
        _choice("quantize", self.quantize, QUANTIZE)
        _choice("via", self.via, ROUTES)
        _choice("optimum_level", self.optimum_level, OPTIMUM_LEVELS)
        _choice("logits", self.logits, LOGITS)
        _choice("attention", self.attention, ATTENTION)
        if (self.logits, self.attention) != ("last", "auto") and (
            self.task != TEXT_GENERATION_WITH_PAST or self.via != "neat_fx"
        ):
            raise ConfigError(
                f"logits= and attention= shape the with-past decoder file (task={TEXT_GENERATION_WITH_PAST!r}, "
                f"via='neat_fx'); here task={self.task!r}, via={self.via!r}: leave them at their defaults"
            )
        for name in ("verify", "approximate", "quantize_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.opset is not None and (
            isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 1
        ):
            raise ConfigError(f"opset must be None (the exporter's default) or a positive integer, got {self.opset!r}")
        if (
            self.dynamic is not True
            and self.dynamic != "all"
            and self.dynamic is not False
            and self.dynamic is not None
            and not isinstance(self.dynamic, (dict, tuple, list))
        ):
            raise ConfigError(
                f'dynamic must be True, "all", False or a torch.export dynamic_shapes spec (dict or tuple), '
                f"got {type(self.dynamic).__name__}"
            )
        if self.verify_inputs is not None and not isinstance(self.verify_inputs, (list, tuple)):
            raise ConfigError(
                "verify_inputs must be a list of example inputs (each a tuple or a dict), got "
                f"{type(self.verify_inputs).__name__}"
            )
        if self.quantize and self.dtype != "fp32":
            raise ConfigError(f"quantize={self.quantize!r} applies to fp32 models; leave dtype='fp32'")
        if not self.quantize_embedding and (self.quantize != "int4" or self.via != "neat_fx"):
            raise ConfigError(
                f"quantize_embedding=False leaves the token embedding table float under quantize='int4' on the "
                f"neat_fx route; here quantize={self.quantize!r}, via={self.via!r}, where no table is quantized by "
                f"us: leave quantize_embedding=True"
            )
        if self.block_size not in INT4_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ConfigError(
                f"block_size must be one of {INT4_BLOCK_SIZES} (int4 weights per scale), got {self.block_size!r}"
            )
        if self.task not in (None, TEXT_GENERATION_WITH_PAST) and self.via != "optimum":
            raise ConfigError(
                f"task={self.task!r}: the neat_fx route knows task=None (the model's forward as captured) and "
                f"{TEXT_GENERATION_WITH_PAST!r} (a decoder with its key/value cache as inputs and outputs); other "
                f"tasks are Optimum's, with via='optimum'"
            )
        if self.via == "genai" and (self.approximate or self.opset is not None or self.verify_inputs is not None):
            raise ConfigError(
                "via='genai' builds with onnxruntime-genai's model builder (precision from dtype= and quantize=, "
                "block_size=, device=) and verifies on the example prompts: approximate=, opset= and "
                "verify_inputs= do not apply; use via='neat_fx' (the default) for those"
            )
        if self.via == "optimum" and (self.dtype != "fp32" or self.quantize or self.approximate):
            raise ConfigError(
                "via='optimum' exports fp32 as Optimum does (no dtype='fp16', quantize= or "
                "approximate=); use via='neat_fx' (the default) for those"
            )

        if self.adapters is not None:
            if isinstance(self.adapters, (str, bytes)) or not isinstance(self.adapters, (dict, list, tuple)):
                raise ConfigError(
                    "adapters= takes saved adapter folders as a list (named after the folders) or a dict {name: "
                    f"folder}} (via='genai': {{name: NeatModule or folder}}), got {type(self.adapters).__name__}"
                )
            if not self.adapters:
                raise ConfigError("adapters= is empty; pass at least one adapter: {name: folder}")
            if self.via == "genai":  # NeatModules or folders; int4/int8 base weights (neat_fx/export/genai_adapters.py)
                if self.dtype != "fp32":
                    raise ConfigError(
                        "adapters= with via='genai' builds an fp32 base (or int4/int8 with quantize=; the adapters "
                        "stay fp32): leave dtype='fp32'"
                    )
            elif self.dtype != "fp32" or self.quantize or self.via != "neat_fx" or self.task is not None:
                raise ConfigError(
                    "adapters= (one model, one ONNX Runtime adapter file per adapter) exports fp32 by the "
                    "neat_fx route, without a cache: leave dtype='fp32', quantize=None, via='neat_fx' and "
                    "task=None (or via='genai' for a decoder with its cache, on onnxruntime-genai)"
                )

    @property
    def rewrites_attention(self) -> bool:
        """Whether the exact FX rewrites run (optimize 'auto' or 'fusions')."""
        return self.optimize in ("auto", "fusions")
