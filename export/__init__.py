"""neat_fx.export: folded models to optimised, verified ONNX for ONNX Runtime (CPU and CUDA).

    from neat_fx.export import to_onnx, session
    report = to_onnx(neat_fx.fold(nm), batch, "model.onnx")
    sess = session("model.onnx")

Needs the extra `onnx` (CPU) or `gpu` (CUDA). Importing neat_fx never imports this package.
"""

from .config import ExportConfig
from .onnx_export import ExportError, ExportReport, to_onnx
from .runtime import BoundRunner, session

__all__ = ["BoundRunner", "ExportConfig", "ExportError", "ExportReport", "session", "to_onnx"]
