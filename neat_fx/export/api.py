"""`to_onnx`, the public entry of the export: validates the options, then hands the work to the single-model
route (`onnx_export`: folded model, fp32/fp16/int8), the Optimum route, or the multi-adapter route (`multi`).
(A module of its own so that `multi`, which builds on `onnx_export`, is not imported by it.)"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from neat_fx import capture as cap

from . import decoder, multi, runtime
from . import onnx_export as oe
from .config import ExportConfig
from .onnx_export import ExportReport


def to_onnx(
    module: nn.Module,
    example_inputs,
    path,
    *,
    dtype: str = "fp32",
    optimize: str = "auto",
    dynamic=True,
    opset: int | None = None,
    verify: bool = True,
    device: str = "cpu",
    approximate: bool = False,
    verify_inputs=None,
    quantize: str | None = None,
    block_size: int = 32,
    quantize_embedding: bool = True,
    via: str = "neat_fx",
    optimum_level: str | None = "O2",
    task: str | None = None,
    adapters=None,
    logits: str = "last",
    attention: str = "auto",
) -> ExportReport:
    """Export `module` to ONNX at `path`, optimised for ONNX Runtime and verified against PyTorch.

    module:   a `fold(nm)` result, a NeatModule (folded first), or a plain model (e.g. after merge_into).
    dtype:    "fp32", or "fp16" (float32 inputs/outputs kept; LayerNorm, Softmax and reductions stay float32).
    optimize: "auto" (exact FX rewrites — positions no output reads left uncomputed, attention's 1/√d in the
              query weights, attention as MatMul/Softmax — + ONNX Runtime graph optimisations saved offline;
              transformer fusions on CUDA), "fusions" (also attention / skip-LayerNorm / bias-GELU fusions on
              CPU), "exporter" (only the exporter's own optimiser) or "none".
    approximate: GELU with the tanh approximation (faster, drift reported).
    quantize: None, "int8": dynamic int8 quantization of the MatMul weights (ONNX Runtime's
              quantize_dynamic, per channel; CPU) — ≈ 2× faster on this project's CPU; or "int4": weight-only
              4-bit MatMul weights (ONNX Runtime's MatMulNBits quantizer, symmetric, one scale per `block_size`
              weights along the input dimension: 32 or 128 are usual; CPU and CUDA). The drift is reported and
              only checked against gross errors (0.5 of each output's scale): judge it by task accuracy.
    quantize_embedding: with quantize="int4" (neat_fx route): the token embedding table too (GatherBlockQuantized,
              the default: the smallest file) or left float — one row read per token, so no speed cost, a larger
              file, and nearer fp32 (on the trained tiny LM of benchmarks/decoder_int4_quality.py: the builder's
              quality exactly, which keeps an untied table float).
    task:     None (the captured forward), or "text-generation-with-past" for a decoder LM: one file for prefill
              and cached decoding, inputs input_ids, attention_mask, position_ids (where the model takes them),
              past_key_values.{i}.key/.value, outputs logits, present.{i}.key/.value (Optimum's names); decoder
              fusions (RMSNorm, rotary, attention) where onnxscript provides them; verified by logits and by
              greedy generation against the model's own generate. Run it with `neat_fx.export.generate`. With
              via="optimum", Optimum's task name.
    logits:   with-past only: "last" (default) gives logits at the last position only, [batch, 1, vocab] — what
              generation reads; the prompt's other positions are not projected onto the vocabulary — or "all"
              (every position, for scoring).
    attention: with-past only: "auto" (default) runs LLaMA / Qwen2 / Mistral attention layers as ONNX Runtime's
              GroupQueryAttention (rotary inside the op, tokens at their column: docs/decoders.md) with packed
              q/k/v and gate/up projections (other layers keep the model's own code; the report says which);
              "model" keeps the model's own code on every layer.
    via:      "neat_fx" (torch.onnx dynamo exporter + our passes), or "optimum" for Hugging Face models where
              optimum-onnx is installed (then `optimum_level` "O1"–"O4" or None, and `task`).
              Or "genai" for Hugging Face decoders of the families onnxruntime-genai's model builder knows
              (LLaMA, Mistral, Qwen2/3, Phi-3, Gemma…): `path` is then a new (or empty) folder that
              `onnxruntime_genai.Model(path)` runs, precision from dtype/quantize ("int4"/"int8" with
              `block_size`), for `device`; verified by greedy generation in onnxruntime-genai against the merged
              model's generate on the example prompts; returns a `genai_route.GenaiReport`.
    dynamic:  True: the batch and sequence axes stay dynamic where the model allows (named batch, sequence, …),
              image channels/height/width static — transform's rule (`neat_fx.capture.default_dynamic_dims`);
              False: static; or a torch.export dynamic_shapes spec keyed by the forward's argument names.
    verify:   run ONNX Runtime on `device` against PyTorch on the example inputs and on a batch of another
              batch size and length; fp32 within 1e-4, fp16 within 1e-2 of each output's scale. On failure
              nothing is written at `path`.
    adapters: saved adapter folders ({name: folder}, or a list named after the folders) to serve from one
              model: `module` is then the untouched base model; each adapted site reads its H and s·B as graph
              inputs with zero defaults (the bare file is the base model), and `<path stem>.<name>.onnx_adapter`
              beside `path` holds each adapter's values for ONNX Runtime's LoRA mechanism (run with
              `neat_fx.export.AdapterSession`, which refuses a file another export wrote). fp32 only; see
              neat_fx/export/multi.py. With via="genai": {name: NeatModule or saved folder} on the base `module`
              (a NeatModule's base is used): one base folder for onnxruntime-genai (fp32, or int4/int8 base weights
              with quantize=; the adapters stay fp32) + `adapters/<name>.onnx_adapter`, each verified by greedy
              tokens against its merged model; serve with `neat_fx.export.GenaiAdapters(path)`; see
              neat_fx/export/genai_adapters.py.
    """
    t_start = time.perf_counter()
    opts = ExportConfig(
        dtype=dtype,
        optimize=optimize,
        dynamic=dynamic,
        opset=opset,
        verify=verify,
        device=device,
        approximate=approximate,
        verify_inputs=verify_inputs,
        quantize=quantize,
        block_size=block_size,
        quantize_embedding=quantize_embedding,
        via=via,
        optimum_level=optimum_level,
        task=task,
        adapters=adapters,
        logits=logits,
        attention=attention,
    )
    oe._onnx_modules()
    if not isinstance(module, nn.Module):
        raise TypeError(f"to_onnx exports an nn.Module, got {type(module).__name__}")
    module = _dequantized(module)
    if via == "genai":  # `path` is the output folder (neat_fx/export/genai_route.py)
        from . import genai_route

        if opts.adapters is None:
            return genai_route.to_folder(module, example_inputs, path, opts, t_start)
        # one base + an adapter file per adapter (neat_fx/export/genai_adapters.py)
        from . import genai_adapters

        report = genai_adapters.to_folder(module, example_inputs, path, opts, *genai_route.precision_and_device(opts))
        report.seconds = time.perf_counter() - t_start
        return report
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass a file path such as {path / 'model.onnx'}")
    device, _ = runtime.resolve_device(device) if verify or device != "cpu" else ("cpu", None)
    if via == "optimum":
        return oe._via_optimum(module, example_inputs, path, opts, device, t_start)
    if adapters is not None:
        return multi.export(module, example_inputs, path, opts, device, t_start)
    if task == decoder.TASK:
        return decoder.export(module, example_inputs, path, opts, device, t_start)
    args, kwargs = cap.split_example_inputs(example_inputs)
    with cap.train_mode(module, False):
        return oe._to_onnx(module, args, kwargs, path, opts, device, t_start)


def _dequantized(module: nn.Module) -> nn.Module:
    """A model on a quantized base (QLoRA-style: neat_fx.quantized) exports as the plain model it computes: a view of
    the base whose quantized weights are dequantized — at the adapted sites W0_deq + ΔW — in their compute dtype
    (bitsandbytes layers as plain linears), so the exporter sees float weights and `quantize="int4"` / "int8" turns
    them into MatMulNBits / MatMulInteger of W0_deq + ΔW. Costs one float copy of the quantized weights while the
    export runs; the model is not written."""
    from .. import quantized
    from ..containers import FoldedModule, NeatModule
    from ..errors import ConfigError
    from ..generate import adapted_view, adapted_weights

    source = module.model if isinstance(module, NeatModule) else module
    if not any(quantized.format_of(t) for t in [*source.parameters(), *source.buffers()]):
        return module
    if isinstance(module, FoldedModule):
        raise ConfigError(
            "this folded module still reads quantized base weights (the unadapted sites); export the NeatModule "
            "itself — to_onnx(nm, …) — which dequantizes the base for the export"
        )
    weights = {
        name: quantized.dequantize(p).detach()
        for name, p in source.named_parameters(remove_duplicate=False)
        if quantized.format_of(p)
    }
    if isinstance(module, NeatModule):
        weights.update(adapted_weights(module))
    weights = {k: nn.Parameter(v, requires_grad=False) for k, v in weights.items()}  # torch.export's state contract
    return adapted_view(source, weights, classes=quantized.view_classes(source))
