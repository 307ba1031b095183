"""neat_fx.export: folded models to optimised, verified ONNX for ONNX Runtime (CPU and CUDA).

    from neat_fx.export import to_onnx, session
    report = to_onnx(neat_fx.fold(nm), batch, "model.onnx")
    sess = session("model.onnx")

Needs the extra `onnx` (CPU) or `gpu` (CUDA). Importing neat_fx never imports this package.
"""
from .onnx_export import ExportError, ExportReport, to_onnx
from .runtime import BoundRunner, feed_for, session

__all__ = ["ExportError", "ExportReport", "to_onnx", "session", "feed_for", "BoundRunner"]
