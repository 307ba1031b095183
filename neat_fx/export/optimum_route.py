"""`via="optimum"`: export with Hugging Face Optimum (and its ORTOptimizer levels) instead of our route.

optimum-onnx currently pins transformers < 4.58; where it cannot be imported, `available()` says why and
to_onnx raises with that reason. The model handed over is a plain transformers model with W0 + ΔW merged.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from torch import nn

from . import merged

TASKS = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForCausalLM": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForImageClassification": "image-classification",
    "Model": "feature-extraction",
}


def available() -> tuple[bool, str]:
    try:
        from optimum.exporters.onnx import main_export  # noqa: F401
        from optimum.onnxruntime import ORTOptimizer  # noqa: F401
    except Exception as exc:  # ImportError, or a version conflict raised at import
        import transformers

        return False, (
            f"optimum-onnx cannot be imported here ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); it "
            f"needs `pip install optimum-onnx` with transformers<4.58 "
            f"(this environment has {transformers.__version__}). "
            f"Use via='neat_fx' (the default), which handles transformers 5."
        )
    return True, ""


def task_of(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in TASKS.items():
        if name.endswith(suffix):
            return task
    raise ValueError(f"cannot tell the Optimum task of {name}; pass task=… (e.g. 'text-classification')")


def merged_copy(module: nn.Module) -> nn.Module:
    """A transformers model with W0 + ΔW merged, leaving the caller's objects untouched (neat_fx/export/merged.py)."""
    return merged.merged_copy(module, route="via='optimum'")


def export(module: nn.Module, tmp_onnx: Path, *, opset: int | None, level: str | None, task: str | None) -> list[str]:
    """Write an Optimum export (optionally ORTOptimizer-optimised at `level`, e.g. "O2") to `tmp_onnx`."""
    from optimum.exporters.onnx import main_export

    model = merged_copy(module)
    work = Path(tempfile.mkdtemp(prefix="neat_optimum_"))
    try:
        model.save_pretrained(work / "model")
        main_export(
            str(work / "model"),
            output=str(work / "onnx"),
            task=task or task_of(model),
            opset=opset,
            no_post_process=False,
            do_validation=False,
        )
        produced = work / "onnx" / "model.onnx"
        done = ["Optimum export"]
        if level:
            from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

            config = getattr(AutoOptimizationConfig, level)()
            ORTOptimizer.from_pretrained(str(work / "onnx")).optimize(
                save_dir=str(work / "opt"), optimization_config=config
            )
            produced = next((work / "opt").glob("*.onnx"))
            done.append(f"ORTOptimizer {level}")
        shutil.move(str(produced), str(tmp_onnx))
        return done
    finally:
        shutil.rmtree(work, ignore_errors=True)
