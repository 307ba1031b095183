"""neat_fx.export: folded models to optimised, verified ONNX for ONNX Runtime (CPU and CUDA).

    from neat_fx.export import to_onnx, session
    report = to_onnx(neat_fx.fold(nm), batch, "model.onnx")
    sess = session("model.onnx")
    to_onnx(base_model, batch, "many.onnx", adapters={"a": dir_a, "b": dir_b})  # + many.a.onnx_adapter, many.b.…
    AdapterSession("many.onnx").run(None, feed, adapter="a")
    to_onnx(neat_fx.fold(nm), batch, "lm.onnx", task="text-generation-with-past", quantize="int4")
    generate("lm.onnx", input_ids, attention_mask, max_new_tokens=64)   # prompt + new tokens, KV cache in ORT
    to_onnx(base_model, None, "lm-genai/", via="genai", adapters={"a": nm_a, "b": dir_b})  # onnxruntime-genai
    GenaiAdapters("lm-genai/").generate(prompt_ids, adapter="a")                          # hot-swapped LoRA

Needs the extra `onnx` (CPU) or `gpu` (CUDA). Importing neat_fx never imports this package.
"""

from .api import to_onnx
from .config import ExportConfig
from .genai_adapters import GenaiAdapters
from .genai_route import GenaiReport
from .generation import generate
from .onnx_export import ExportError, ExportReport
from .runtime import AdapterSession, BoundRunner, session

__all__ = [
    "AdapterSession",
    "BoundRunner",
    "ExportConfig",
    "ExportError",
    "ExportReport",
    "GenaiAdapters",
    "GenaiReport",
    "generate",
    "session",
    "to_onnx",
]
