"""ONNX from a quantized base (issue 22, item 4): `to_onnx(nm, …)` on an NF4 base (torchao, bitsandbytes) exports the
plain model nm computes — W0_deq + ΔW at the sites, the other quantized weights dequantized — in fp32 (equal to nm
within 1e-4) and with `quantize="int4"` (MatMulNBits of W0_deq + ΔW, verified like any int4 export), with and without
the KV cache; the user's model stays quantized and unwritten."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import neat_fx

import decoders
from helpers import randomize_adapters

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

TASK = "text-generation-with-past"


def _wide_llama():
    """A LLaMA wide enough for whole int4 blocks (hidden 128, intermediate 256)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **decoders._common(hidden_size=128, intermediate_size=256, vocab_size=512, initializer_range=0.02)
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _quantized(fmt: str, patterns="all-linear"):
    import test_quantized as Q

    model = Q.quantize(copy.deepcopy(_wide_llama()), fmt)
    example = decoders.example_inputs()
    nm = neat_fx.transform(model, patterns, example, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.2, seed=5)  # adapters that matter next to int4's error
    return model, nm, example


def _ops(path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _float_weight_matmuls(path) -> int:
    """MatMul / Gemm nodes that multiply by a 2-D float weight stored in the file (what int4 should have replaced)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT}
    return sum(n.op_type in ("MatMul", "Gemm") and any(x in weights for x in n.input) for n in graph.node)


@pytest.mark.parametrize("fmt", ["torchao.nf4", "bnb.nf4"])
def test_onnx_from_a_quantized_base(fmt, tmp_path):
    pytest.importorskip("torchao" if fmt.startswith("torchao") else "bitsandbytes")
    from neat_fx import quantized
    from neat_fx.export import session, to_onnx

    model, nm, example = _quantized(fmt)
    formats = {n: quantized.format_of(p) for n, p in model.named_parameters() if quantized.format_of(p)}
    assert len(formats) == 14  # every projection of the 2 layers is quantized; the head is not
    with torch.no_grad():
        want = nm(**example).logits.numpy()

    # fp32: the plain function nm computes, verified by to_onnx and checked here against nm itself
    path = tmp_path / "fp32.onnx"
    to_onnx(nm, example, path)
    feeds = {k: v.numpy() for k, v in example.items()}
    got = session(path, "cpu").run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    ops = _ops(path)
    assert "MatMulNBits" not in ops and not any("Dequantize" in op for op in ops)  # plain float weights

    # int4: MatMulNBits of W0_deq + ΔW for every projection (and the head), with and without the cache
    for task in (None, TASK):
        path = tmp_path / f"int4_{task}.onnx"
        report = to_onnx(nm, example, path, quantize="int4", block_size=32, **({"task": task} if task else {}))
        # every projection and the head (packed q/k/v and gate/up count once where the export packs them)
        assert _ops(path).get("MatMulNBits", 0) >= 9 and _float_weight_matmuls(path) == 0, _ops(path)
        assert any(o.startswith("int4 weight-only") for o in report.optimizations)
    got = session(tmp_path / "int4_None.onnx", "cpu").run(None, feeds)[0]
    # int4's error is small next to what the adapters change (std 0.05 adapters on this model)
    with torch.no_grad(), nm.disable_adapters():
        base = nm(**example).logits.numpy()
    assert np.abs(got - want).mean() < 0.5 * np.abs(want - base).mean()

    # the model is as it was: quantized, in the same formats
    assert {n: quantized.format_of(p) for n, p in model.named_parameters() if quantized.format_of(p)} == formats


def test_a_fold_of_a_quantized_base_is_refused_with_the_fix(tmp_path):
    pytest.importorskip("torchao")
    from neat_fx.export import to_onnx

    _, nm, example = _quantized("torchao.nf4", patterns=["*q_proj"])  # the other projections stay quantized
    with pytest.raises(neat_fx.ConfigError, match=r"to_onnx\(nm"):
        to_onnx(neat_fx.fold(nm), example, tmp_path / "m.onnx")
