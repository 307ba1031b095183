"""`to_onnx`: a folded (or merged) model → an optimised ONNX file for ONNX Runtime, verified against
PyTorch before it is renamed into place."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neat_fx import capture as cap
from neat_fx.atomic import Staging
from neat_fx.containers import GraphContainer, NeatModule
from neat_fx.errors import NeatError
from neat_fx.numerics import compare, flat_tensors

from . import passes, runtime
from . import verify as ver
from .config import ExportConfig

log = logging.getLogger("neat_fx.export")

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# int8 changes the numbers by design (a fine-tuned MiniLM: up to 0.2 of the logit scale, 98.7 % of argmax kept,
# same SST-2 accuracy): the check only catches a broken model; judge int8 by task accuracy.
INT8_TOLERANCE = 0.5
# Protobuf cannot hold a file over 2 GB: above this the weights go to `<path>.data` beside the model.
EXTERNAL_DATA_ABOVE = 2 * 1024**3 - 64 * 2**20
# Fused ONNX Runtime contrib ops worth counting in the report.
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "FusedMatMul",
    "FusedGemm",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "RotaryEmbedding",
    "GroupQueryAttention",
    "QuickGelu",
    "BiasSoftmax",
)
# On this project's CPU measurements ONNX Runtime's SkipLayerNormalization was slower than Add + LayerNorm.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
FP16_KEEP_FP32 = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Erf",
    "Reciprocal",
    "Div",
)


class ExportError(NeatError, RuntimeError):
    """The module could not be exported, optimised or verified; nothing was left at the destination."""


@dataclass
class ExportReport:
    """What `to_onnx` produced and checked."""

    path: Path
    size_bytes: int
    dtype: str
    device: str
    opset: int | None
    optimizations: list[str]
    fused_ops: dict[str, int]
    op_counts: dict[str, int]
    parity: list[dict]
    tolerance: float
    input_names: list[str]
    output_names: list[str]
    folded_first: bool = False
    external_data: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # multi-adapter export (to_onnx(..., adapters=...)): adapter name -> its ONNX Runtime adapter file, and the
    # graph inputs (with defaults) that the adapter files override
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_inputs: list[str] = field(default_factory=list)
    # with-past export (task="text-generation-with-past"): greedy generation through ONNX Runtime vs PyTorch
    # ({"new_tokens", "prompts": their lengths, "token_agreement": fraction of equal new tokens[, "ties"]})
    generation: dict = field(default_factory=dict)
    # seconds per phase of the export (with-past: torch.export, fusions, save, quantization, verification)
    phases: dict = field(default_factory=dict)

    @property
    def max_rel_diff(self) -> float:
        return max((p["max_rel"] for p in self.parity), default=float("nan"))

    def __str__(self) -> str:
        lines = [
            f"ONNX model   {self.path} ({self.size_bytes / 2**20:.1f} MB"
            f"{', external data' if self.external_data else ''})",
            f"precision    {self.dtype}, verified on {self.device} "
            f"(tolerance {self.tolerance:g} of each output's scale)",
        ]
        for p in self.parity:
            who = f"adapter {p['adapter']!r}, " if p.get("adapter") else ("no adapter, " if "adapter" in p else "")
            who += f"{p['step']}, " if p.get("step") else ""
            lines.append(
                f"parity       {who}inputs {p['shapes']}: max abs {p['max_abs']:.2e}, max rel {p['max_rel']:.2e}"
                + (f", cosine {p['min_cosine']:.4f}" if "min_cosine" in p else "")
            )
        if self.generation:
            g = self.generation
            lines.append(
                f"generation   greedy, {g['new_tokens']} new tokens, prompts of {g['prompts']} tokens in one batch: "
                f"{g['token_agreement']:.1%} of tokens equal PyTorch's"
                + (f" (diverged only after ties: {g['ties']})" if g.get("ties") else "")
            )
        if self.adapters:
            lines.append(
                f"adapters     {len(self.adapters)} ONNX Runtime adapter files overriding {len(self.adapter_inputs)} "
                f"inputs: " + ", ".join(f"{k} ({v.name})" for k, v in self.adapters.items())
            )
        lines.append(f"optimised    {', '.join(self.optimizations) or 'no'}")
        if self.fused_ops:
            lines.append("fused ops    " + ", ".join(f"{k} ×{v}" for k, v in sorted(self.fused_ops.items())))
        if self.phases:
            lines.append("time         " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()))
        if self.folded_first:
            lines.append("note         the NeatModule was folded first (neat_fx.fold)")
        lines += [f"note         {n}" for n in self.notes]
        return "\n".join(lines)


def _onnx_modules():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'neat-fx[onnx]'") from None
    runtime._ort()


def _as_graph(module: nn.Module, args, kwargs) -> tuple[GraphContainer, bool]:
    """The module as a container of captured graphs without adapters, and whether it had to be folded."""
    from neat_fx.fold import fold
    from neat_fx.transform import capture_plain

    if isinstance(module, NeatModule):
        log.info("to_onnx: folding the NeatModule first (W0 + ΔW as constants)")
        return fold(module), True
    if isinstance(module, GraphContainer):
        return module, False
    return capture_plain(module, (args, kwargs), modes=("eval",)), False


def _export_container(src: GraphContainer, opts: ExportConfig):
    """A copy of `src`'s eval graph, bound to the same state, with the pre-export FX passes applied (their
    constants live on the copy's GraphModule). Returns (container, what the passes that changed it did)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = copy.deepcopy(src.graph("eval"))
    out = GraphContainer()
    for name, child in src._modules.items():
        out.add_module(name, child)
    gm = out._set_graph("eval", graph)
    pm = passes.export_pass_manager(rewrite_attention=opts.rewrites_attention, approximate=opts.approximate)
    pm(gm)
    out._set_reference(src._reference_name)
    out.eval()
    return out, passes.applied(pm)


def _proto_bytes(proto) -> int:
    """Size of the model with its weights, without serialising it (which fails over 2 GB)."""
    import numpy as np

    total = 0
    for t in proto.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            total += n * 4
    return total


def _count_ops(model_proto) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in model_proto.graph.node))


def _to_onnx(module, args, kwargs, path: Path, opts: ExportConfig, device: str, t_start: float) -> ExportReport:
    import onnx

    check_int4_weights(module, opts)
    program, folded_first, optimizations, reference_out = _torch_export(module, args, kwargs, opts)
    _name_axes(program)
    second = _probe_second_batch(program, module, args, kwargs) if opts.verify and opts.verify_inputs is None else None
    proto, fusions = _optimized_proto(program, opts, device)
    optimizations += fusions
    meta = _metadata(opts)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    external = _proto_bytes(proto) > EXTERNAL_DATA_ABOVE

    tol = INT8_TOLERANCE if opts.quantize else TOLERANCE[opts.dtype] * (10 if opts.approximate else 1)
    final_data = path.with_name(path.name + ".data")
    with Staging() as st:
        tmp = st.path(path, ".onnx")
        tmp_data = tmp.with_name(tmp.name + ".data")
        st.add(tmp_data, final_data, optional=True)
        _save(onnx, proto, tmp, tmp_data, external)
        optimizations += _post_process(onnx, tmp, tmp_data, external, opts, device, meta)
        external = tmp_data.exists()
        parity = []
        if opts.verify:
            parity = _verify(tmp, device, module, args, kwargs, reference_out, opts.verify_inputs, second, tol)
        if external:
            _relocate_external(onnx, tmp, final_data.name)
        st.commit()
    return _report(
        onnx, path, final_data, external, opts, device, optimizations, parity, tol, proto, folded_first, t_start
    )


def _torch_export(module, args, kwargs, opts: ExportConfig, optimize_program: bool = True):
    """The module's eval graph, with the FX passes applied, exported by torch.onnx's dynamo exporter.
    Returns (ONNX program, whether the module was folded first, what was done, the module's own outputs).
    optimize_program=False leaves the exporter's optimiser to the caller (program.optimize())."""
    container, folded_first = _as_graph(module, args, kwargs)  # a plain model's bad inputs are reported here
    container.eval()
    with torch.no_grad():
        reference_out = module(*args, **kwargs)
    exp, applied = _export_container(container, opts)
    gm = exp.graph_module("eval")
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    inputs = dict(bound.arguments)
    dynamic_shapes = cap.dynamic_shapes_for(gm.forward, (), inputs, opts.dynamic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                gm,
                (),
                None,
                kwargs=inputs,
                dynamo=True,
                optimize=opts.optimize != "none" and optimize_program,
                opset_version=opts.opset,
                dynamic_shapes=dynamic_shapes,
                output_names=ver.output_names(reference_out),
                verbose=False,
            )
        except Exception as exc:
            raise ExportError(
                f"torch.onnx could not export {type(module).__name__}:\n    {cap.first_lines(exc)}"
                f"{cap.user_frame(exc, module)}{_untranslatable_ops(exc)}\n"
                f"The usual causes: an op without an ONNX translation (pass a custom translation via "
                f"torch.onnx.export directly) or data-dependent control flow."
            ) from exc
    done = list(applied)
    if opts.optimize != "none":
        done.append("exporter optimiser (constant folding, dead code)")
    return program, folded_first, done, reference_out


def _untranslatable_ops(exc: BaseException) -> str:
    """The ops torch.onnx found no translation for, from wherever in the exception chain it names them."""
    text, seen = "", set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text += f"\n{exc}"
        exc = exc.__cause__ or exc.__context__
    ops = {f"{op}.{overload}" for op, overload in re.findall(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", text)}
    for block in re.findall(r"Unsupported FX nodes: (\{[^}]*\})", text):
        ops.update(re.findall(r"'([^']+\.[^']+)'", block))
    if not ops:
        return ""
    moe = any("grouped_mm" in op for op in ops)
    return (
        f"\n    ops without an ONNX translation: {', '.join(sorted(ops))} — give them one (torch.onnx.export's "
        f"custom_translation_table), or make the model use another implementation of them"
        + (" (Hugging Face MoE models: experts_implementation='batched_mm' exports)" if moe else "")
    )


def _optimized_proto(program, opts: ExportConfig, device: str, *, fuse: bool | None = None, kv_io: bool = False):
    """The ONNX model as a protobuf, with onnxscript's transformer fusions (where asked for; `fuse` overrides
    the rule) and in fp16 (where asked for; `kv_io`: the key/value cache inputs/outputs in fp16 too, only the
    logits kept float32). Returns (proto, what was done)."""
    import onnx_ir as ir

    done = []
    model_ir = program.model
    if fuse is None:
        fuse = opts.optimize == "fusions" or (opts.optimize == "auto" and device == "cuda")
    if fuse:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        result = optimize_for_ort(model_ir)
        model_ir, counts = result if isinstance(result, tuple) else (model_ir, {})
        fused = {k: v for k, v in counts.items() if v}
        repaired = _flatten_attention_into_gemm(model_ir)
        if repaired:
            fused["attention output flattened again before Gemm"] = repaired
        done.append(
            "transformer fusions (onnxscript ort_fusions: "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(fused.items()))
            + ")"
        )
    proto = ir.serde.serialize_model(model_ir)
    if opts.dtype == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = convert_float_to_float16(
            proto,
            keep_io_types=["logits"] if kv_io else True,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32),
        )
        done.append("fp16 weights and math (float32 inputs/outputs; norms, softmax, reductions in float32)")
    return proto, done


ATTENTION_OPS = ("MultiHeadAttention", "Attention", "GroupQueryAttention")


def _flatten_attention_into_gemm(model_ir) -> int:
    """onnxscript's MHA fusion (0.7) replaces the attention output's Reshape to [tokens, hidden] with the 3-D
    MultiHeadAttention output even when a Gemm (GPT-2's Conv1D) reads it, which ONNX Runtime then refuses
    (Gemm takes 2-D). Put the flattening Reshape back. Returns how many."""
    import numpy as np
    import onnx_ir as ir

    graph = model_ir.graph
    repaired = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        x, weight = node.inputs[0], node.inputs[1]
        producer = x.producer() if x is not None else None
        if producer is None or producer.op_type not in ATTENTION_OPS or weight is None:
            continue
        dims = weight.const_value.shape if weight.const_value is not None else weight.shape
        trans_b = node.attributes.get("transB")
        k = dims[1] if trans_b is not None and trans_b.as_int() else dims[0]
        if not isinstance(k, int):
            continue
        shape = ir.Value(name=f"{node.name}.flat_shape", const_value=ir.tensor(np.array([-1, k], dtype=np.int64)))
        graph.register_initializer(shape)
        flatten = ir.Node("", "Reshape", [x, shape], name=f"{node.name}.flatten")
        graph.insert_before(node, flatten)
        node.replace_input_with(0, flatten.outputs[0])
        x.shape = None  # it kept the replaced Reshape's 2-D shape
        repaired += 1
    return repaired


def _disabled_optimizers(opts: ExportConfig) -> dict[str, tuple[str, ...]]:
    return {"cpu": CPU_DISABLED_OPTIMIZERS if opts.optimize == "auto" else (), "cuda": ()}


def _metadata(opts: ExportConfig) -> dict[str, str]:
    """What the file records for the sessions that will run it (runtime.session reads it back)."""
    disabled = _disabled_optimizers(opts)
    return {
        "neat_fx.export.dtype": opts.dtype,
        "neat_fx.export.optimize": opts.optimize,
        runtime.META_DISABLED + ".cpu": ",".join(disabled["cpu"]),
        runtime.META_DISABLED + ".cuda": ",".join(disabled["cuda"]),
    }


def _post_process(
    onnx,
    tmp: Path,
    tmp_data: Path,
    external: bool,
    opts: ExportConfig,
    device: str,
    meta: dict,
    resave_metadata: bool = True,
):
    """ONNX Runtime's offline graph optimisations and int8/int4 quantization, applied to the temporary file in
    place (a model over 2 GB keeps its weights in `tmp_data`, gone when the quantized model fits in one file).
    resave_metadata=False: trust ONNX Runtime to keep the file's metadata in the optimised model (1.32 does; the
    with-past export reads it back in its verification) instead of loading and writing the model once more.
    Returns what was done."""
    done = []
    if opts.quantize == "int4":  # first: ONNX Runtime would fuse a tied head's transpose into a FusedMatMul
        done.append(_int4(onnx, tmp, tmp_data, opts, device, meta))
        external = tmp_data.exists()
    if opts.optimize in ("auto", "fusions") and not external:
        _ort_offline(tmp, device, list(_disabled_optimizers(opts)[device]))
        done.append(f"ONNX Runtime graph optimisations saved offline ({device}, level EXTENDED)")
        if resave_metadata:
            _save(onnx, _with_metadata(onnx, tmp, meta), tmp, tmp_data, external)
    if opts.quantize == "int8":
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        # a plain name in a private folder: the quantizer names its weights file after the model, and the
        # hidden temporary names would give it a location onnx refuses ("..name.data")
        with tempfile.TemporaryDirectory(prefix=".int8-", dir=tmp.parent) as work:
            q_tmp = Path(work) / "quantized.onnx"
            quantize_dynamic(
                str(tmp),
                str(q_tmp),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                per_channel=True,  # per output channel: 3× less drift than per tensor
                use_external_data_format=external,
            )
            _resave(onnx, _with_metadata(onnx, q_tmp, meta), tmp, tmp_data)
        done.append("dynamic int8 quantization of MatMul weights")
    return done


def _int4(onnx, tmp: Path, tmp_data: Path, opts: ExportConfig, device: str, meta: dict) -> str:
    """Weight-only int4 of every MatMul with a constant weight (ONNX Runtime's MatMulNBits quantizer), and of the
    token embedding table (GatherBlockQuantized, blocks along the hidden size, as onnxruntime-genai's builder) unless
    `quantize_embedding=False`."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers  # its import configures the root logger at INFO: the user's logging is theirs
    root.setLevel(level)

    proto = onnx.load(str(tmp))
    transposed = _materialize_transposed_weights(onnx, proto)
    constants = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    weights = [n for n in proto.graph.node if n.op_type == "MatMul" and len(constants.get(n.input[1], ())) == 2]

    def _table(node) -> bool:  # an embedding lookup: a Gather from a constant [vocabulary, hidden] table
        dims = constants.get(node.input[0], ())
        return len(dims) == 2 and dims[1] >= opts.block_size

    # a weight with fewer input features than a block would be mostly padding: left in float
    small = [n.name for n in weights if constants[n.input[1]][0] < opts.block_size]
    if len(small) == len(weights):
        counts = _count_ops(proto)
        raise ExportError(
            f"quantize='int4' found no MatMul with a constant weight of at least block_size={opts.block_size} input "
            f"features to quantize ({len(weights)} constant MatMul weights, {len(small)} smaller; ops: "
            f"{', '.join(sorted(counts))}). Use a smaller block_size, quantize='int8', or fp32. Nothing was written."
        )
    # accuracy level 4: int8 activations in the CPU kernel (what onnxruntime-genai's builder uses on CPU);
    # CUDA ignores it, so one file serves both
    quantizer = MatMulNBitsQuantizer(
        proto,
        bits=4,
        block_size=opts.block_size,
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_exclude=small + [n.name for n in proto.graph.node if n.op_type == "Gather" and not _table(n)],
        op_types_to_quantize=("MatMul", "Gather") if opts.quantize_embedding else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    with _quiet("onnxruntime.quantization"):
        quantizer.process()
    proto = quantizer.model.model
    counts = _count_ops(proto)
    for k, v in meta.items():
        if k not in {p.key for p in proto.metadata_props}:
            proto.metadata_props.add(key=k, value=v)
    _resave(onnx, proto, tmp, tmp_data)
    kept = f"; {len(small)} weights under {opts.block_size} input features kept float" if small else ""
    tables = counts.get("GatherBlockQuantized", 0)
    if transposed:
        kept += f"; {transposed} transposed weight(s) (a head tied to the embedding) quantized as their own copy"
    return (
        f"int4 weight-only quantization (MatMulNBits ×{counts.get('MatMulNBits', 0)}"
        f"{f', embedding GatherBlockQuantized ×{tables}' if tables else ''}, block {opts.block_size}, symmetric, "
        f"accuracy level 4{kept})"
    )


_NONE = type("NoTensor", (), {"dims": ()})()


def _materialize_transposed_weights(onnx, proto) -> int:
    """MatMul(x, Transpose(W)) or FusedMatMul(x, W, transB=1) with W a constant (a head tied to the embedding
    table reads it so) becomes MatMul(x, Wᵀ) with its own transposed copy, which the int4 quantizer can take (it
    quantizes MatMul with constant weights only). Returns how many."""
    from onnx import numpy_helper

    constants = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    count = 0
    for node in proto.graph.node:  # onnxscript's fusions may already have made it FusedMatMul(x, W, transB=1)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain_trans_b = attrs.pop("transB", 0) == 1 and attrs.pop("alpha", 1.0) == 1.0
        plain_trans_b = plain_trans_b and not any(attrs.get(k, 0) for k in ("transA", "transBatchA", "transBatchB"))
        if node.op_type == "FusedMatMul" and plain_trans_b and len(constants.get(node.input[1], _NONE).dims) == 2:
            weight = constants[node.input[1]]
            name = f"{weight.name}.transposed"
            if name not in constants:
                constants[name] = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name)
                proto.graph.initializer.append(constants[name])
            node.op_type, node.domain = "MatMul", ""
            del node.attribute[:]
            node.input[1] = name
            count += 1
            continue
        if node.op_type != "MatMul" or node.input[1] in constants:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in constants:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        weight = constants[t.input[0]]
        if len(weight.dims) != 2 or perm != [1, 0]:
            continue
        name = f"{t.input[0]}.transposed"
        if name not in constants:
            copy_ = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), name)
            proto.graph.initializer.append(copy_)
            constants[name] = copy_
        node.input[1] = name
        consumers[t.output[0]] -= 1
        if not consumers[t.output[0]]:
            proto.graph.node.remove(t)
        count += 1
    return count


def share_transposed_constants(onnx, proto) -> int:
    """MatMul(x, Wᵀ) with Wᵀ a constant that is the transpose of another constant W (a head tied to the embedding
    table, after constant folding) → FusedMatMul(x, W, transB=1): one copy of the table in the file, at the same
    speed on ONNX Runtime's CPU kernels (benchmarks/tied_head_matmul.py: 0.995× / 1.011× at 1 / 128 tokens).
    Returns how many."""
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    large = [t for t in inits.values() if len(t.dims) == 2 and np.prod(t.dims) >= 2**18]
    by_dims: dict[tuple, list] = {}
    for t in large:
        by_dims.setdefault(tuple(t.dims), []).append(t)
    uses: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    shared = 0
    for node in proto.graph.node:
        wt = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if wt is None or tuple(wt.dims) not in by_dims:
            continue
        wt_array = None
        for w in by_dims.get((wt.dims[1], wt.dims[0]), []):
            if w.name == wt.name:
                continue
            wt_array = numpy_helper.to_array(wt) if wt_array is None else wt_array
            if np.array_equal(numpy_helper.to_array(w).T, wt_array):
                node.op_type, node.domain = "FusedMatMul", "com.microsoft"
                node.input[1] = w.name
                node.attribute.append(onnx.helper.make_attribute("transB", 1))
                uses[wt.name] -= 1
                shared += 1
                break
    if shared:
        unused = [t for t in proto.graph.initializer if not uses.get(t.name)]
        for t in unused:
            proto.graph.initializer.remove(t)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return shared


def check_int4_weights(module: nn.Module, opts: ExportConfig):
    """Before any export work: int4 needs a 2-D weight with at least one block of input features."""
    if opts.quantize != "int4":
        return
    if not any(p.dim() == 2 and p.shape[1] >= opts.block_size for p in module.parameters()):
        raise ExportError(
            f"quantize='int4' found no MatMul weight of at least block_size={opts.block_size} input features in "
            f"{type(module).__name__} (its largest 2-D weights are narrower). Use a smaller block_size, "
            f"quantize='int8', or fp32. Nothing was written."
        )


def _resave(onnx, proto, tmp: Path, tmp_data: Path):
    """Write `proto` over the temporary model: its weights beside it in `tmp_data` only if over 2 GB."""
    external = _proto_bytes(proto) > EXTERNAL_DATA_ABOVE
    if tmp_data.exists():
        tmp_data.unlink()  # the quantized model may no longer need it; a new one is written in full otherwise
    _save(onnx, proto, tmp, tmp_data, external)


@contextlib.contextmanager
def _quiet(name: str):
    """The quantizer logs a line per node at INFO."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _report(
    onnx,
    path,
    final_data,
    external,
    opts,
    device,
    optimizations,
    parity,
    tol,
    proto,
    folded_first,
    t_start,
    final_proto=None,
) -> ExportReport:
    """final_proto: the file at `path` already loaded (without external data), else it is loaded here."""
    final = final_proto if final_proto is not None else onnx.load(str(path), load_external_data=False)
    model_counts = _count_ops(final)
    notes = []
    if opts.approximate:
        notes.append("approximate GELU: verified with a 10× looser tolerance; the drift is the parity above")
    if opts.quantize:
        notes.append(
            f"{opts.quantize}: verified only against gross errors (0.5 of each output's scale); the drift is the "
            f"parity above — judge {opts.quantize} by task accuracy"
        )
    return ExportReport(
        path=path,
        size_bytes=path.stat().st_size + (final_data.stat().st_size if external else 0),
        dtype=opts.dtype,
        device=device,
        opset=opts.opset,
        optimizations=optimizations,
        fused_ops={k: v for k, v in model_counts.items() if k in FUSED_OPS},
        op_counts=model_counts,
        parity=parity,
        tolerance=tol,
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        folded_first=folded_first,
        external_data=external,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )


def _name_axes(program) -> None:
    """Give the ONNX inputs the shapes torch.export settled on: dimensions it specialised (a ViT's 3 channels)
    become fixed sizes, dynamic ones get readable names (batch, sequence, …) everywhere in the graph."""
    import onnx_ir as ir

    ep = getattr(program, "exported_program", None)
    if ep is None:
        return
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[n].meta.get("val") for n in ep.graph_signature.user_inputs if n in placeholders]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    graph_inputs = list(program.model.graph.inputs)
    if len(vals) != len(graph_inputs):
        return
    rename, owner = {}, {}  # old symbol -> new name; new name -> example size it stands for
    for value, fake in zip(graph_inputs, vals):
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) != fake.dim():
            continue
        for axis, (d, f) in enumerate(zip(dims, fake.shape)):
            if isinstance(f, int) or (hasattr(f, "node") and f.node.is_constant()):
                dims[axis] = int(f)
            elif isinstance(d, ir.SymbolicDim) and d.value and d.value not in rename:
                size = int(f.node.hint) if hasattr(f, "node") and f.node.hint is not None else None
                want = (
                    "batch"
                    if axis == 0
                    else ("sequence" if axis == 1 and not fake.is_floating_point() else f"{value.name}_dim{axis}")
                )
                # Inputs that share a batch (or sequence) size share its name: they must agree at run time.
                while want in owner and owner[want] != size:
                    want += "_"
                owner[want] = size
                rename[d.value] = want
        value.shape = ir.Shape(dims)
    if rename:
        program.rename_axes(rename)


def _with_metadata(onnx, model_path: Path, meta: dict):
    """The model at `model_path` (rewritten by ONNX Runtime or the quantizer) with our metadata entries."""
    proto = onnx.load(str(model_path))
    keys = {p.key for p in proto.metadata_props}
    for k, v in meta.items():
        if k not in keys:
            proto.metadata_props.add(key=k, value=v)
    return proto


def _relocate_external(onnx, model_path: Path, location: str):
    """Point the external tensors of the (verified) temporary model at the data file's final name."""
    proto = onnx.load(str(model_path), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(proto, str(model_path))


def _save(onnx, proto, tmp: Path, tmp_data: Path, external: bool):
    if external:
        onnx.save_model(
            proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data.name
        )
    else:
        onnx.save_model(proto, str(tmp))


def _ort_offline(tmp: Path, device: str, disabled: list[str], quiet: bool = False):
    ort = runtime._ort()
    _, providers = runtime.resolve_device(device)
    so = ort.SessionOptions()
    if quiet:  # errors only (a multi-adapter model: one warning per overridable initializer)
        so.log_severity_level = 3
    # EXTENDED, not ALL: layout transforms of level ALL are specific to the machine that runs them.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    out = tmp.with_name(tmp.name + ".opt.onnx")  # the suffix picks the format: .ort would be flatbuffers
    so.optimized_model_filepath = str(out)
    try:
        ort.InferenceSession(str(tmp), so, providers=providers, disabled_optimizers=disabled or None)
        os.replace(out, tmp)
    finally:
        if out.exists():
            out.unlink()


def _verify(tmp, device, module, args, kwargs, reference_out, verify_inputs, second, tol):
    sess = runtime.session(tmp, device)
    onnx_inputs = [i.name for i in sess.get_inputs()]
    batches = [((args, kwargs), reference_out)]
    extra = [cap.split_example_inputs(v) for v in verify_inputs] if verify_inputs is not None else [second]
    for a, k in (e for e in extra if e is not None):
        with torch.no_grad():
            batches.append(((a, k), module(*a, **k)))
    if len(batches) == 1:
        log.warning("to_onnx: no second input shape the model accepts was found; verified on the example only")
    parity = []
    for n_batch, ((a, k), ref) in enumerate(batches):
        leaves = [t for t in torch.utils._pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
        feed = _feed(onnx_inputs, a, k)
        shapes = [tuple(t.shape) for t in leaves]
        try:
            got = sess.run(None, feed)
        except Exception as exc:
            hint = (
                "The exporter fixed a size that the model keeps dynamic (e.g. adaptive pooling over image "
                "height/width). Pass dynamic= a torch.export dynamic_shapes spec that leaves only the axes that "
                "can vary (e.g. the batch), or dynamic=False."
                if n_batch
                else ""
            )
            raise ExportError(
                f"ONNX Runtime ({device}) fails on inputs of shapes {shapes}, which the PyTorch module accepts:\n"
                f"    {cap.first_lines(exc, 2)}\n{hint} Nothing was written."
            ) from exc
        result = compare(flat_tensors(ref), list(got))
        result.pop("ok")
        result["shapes"] = shapes
        parity.append(result)
        if not result["max_rel"] <= tol:
            raise ExportError(
                f"ONNX Runtime ({device}) and PyTorch disagree on inputs of shapes {shapes}: max abs "
                f"difference {result['max_abs']:.3g}, max relative {result['max_rel']:.3g} > tolerance {tol:g}"
                f"{' (' + result['note'] + ')' if 'note' in result else ''}. Nothing was written."
            )
    return parity


def _feed(onnx_inputs: list[str], args, kwargs) -> dict:
    """ONNX Runtime inputs: keyword inputs by name (a missing token_type_ids as zeros, as BERT defaults to),
    positional ones in order."""
    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if kwargs and not args and all(n in kwargs or n == "token_type_ids" for n in onnx_inputs):
        feed = {}
        for n in onnx_inputs:
            t = kwargs[n] if n in kwargs else torch.zeros_like(kwargs["input_ids"])
            feed[n] = t.detach().cpu().numpy()
        return feed
    return {n: t.detach().cpu().numpy() for n, t in zip(onnx_inputs, leaves)}


def _probe_second_batch(program, module, args, kwargs):
    """Find which dynamic ONNX axes the PyTorch module really accepts other sizes on (one symbol at a time),
    fix the others to the example's size in the ONNX inputs, and return a batch that varies all accepted
    ones together (None if there are none)."""
    import onnx_ir as ir

    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    tensor_idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    inputs = list(program.model.graph.inputs)
    axes: dict[tuple[int, int], str] = {}
    for value, i in zip(inputs, tensor_idx):
        for axis, d in enumerate(value.shape or ()):
            if isinstance(d, ir.SymbolicDim) and d.value:
                axes[(i, axis)] = d.value

    def accepted(candidate):
        return _resized_if_accepted(module, args, kwargs, candidate)

    good, bad = {}, set()
    for sym in dict.fromkeys(axes.values()):
        group = {key: s for key, s in axes.items() if s == sym}
        if accepted(group) is not None:
            good.update(group)
        else:
            bad.add(sym)
    log.debug("to_onnx: dynamic axes %s; the module accepts %s, rejects %s", axes, sorted(set(good.values())), bad)
    if bad:
        for value, i in zip(inputs, tensor_idx):
            dims = list(value.shape or ())
            changed = False
            for axis, d in enumerate(dims):
                if isinstance(d, ir.SymbolicDim) and d.value in bad:
                    dims[axis] = int(leaves[i].shape[axis])
                    changed = True
            if changed:
                value.shape = ir.Shape(dims)
    return accepted(good) if good else None


def _simple_second_batch(module, args, kwargs):
    """Batch + 1 and, for integer inputs (token ids, masks), length - 1; None if the module rejects it."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    axes = {}
    for i, t in enumerate(leaves):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            axes[(i, 0)] = "batch"
            if t.dim() >= 2 and not t.is_floating_point():
                axes[(i, 1)] = "sequence"
    return _resized_if_accepted(module, args, kwargs, axes)


def _resized_if_accepted(module, args, kwargs, axes):
    """The example resized along `axes` (see verify.other_batch) if the PyTorch module runs on it, else None."""
    a, k = ver.other_batch(args, kwargs, axes)
    try:
        with torch.no_grad():
            module(*a, **k)
    except Exception:
        return None
    return a, k


def _via_optimum(module, example_inputs, path: Path, opts: ExportConfig, device: str, t_start: float) -> ExportReport:
    import onnx

    from . import optimum_route

    ok, why = optimum_route.available()
    if not ok:
        raise ExportError(why)
    args, kwargs = cap.split_example_inputs(example_inputs)
    with cap.train_mode(module, False), Staging() as st:
        tmp = st.path(path, ".onnx")
        with torch.no_grad():
            reference_out = module(*args, **kwargs)
        done = optimum_route.export(module, tmp, opset=opts.opset, level=opts.optimum_level, task=opts.task)
        proto = onnx.load(str(tmp))
        parity = []
        if opts.verify:
            second = _simple_second_batch(module, args, kwargs) if opts.verify_inputs is None else None
            parity = _verify(
                tmp, device, module, args, kwargs, reference_out, opts.verify_inputs, second, TOLERANCE["fp32"]
            )
        st.commit()
    return _report(onnx, path, None, False, opts, device, done, parity, TOLERANCE["fp32"], proto, False, t_start)
