"""A head tied to the embedding table in ONNX Runtime: MatMul on a transposed copy of the table (what the exporter's
constant folding leaves, two copies in the file) vs FusedMatMul(transB=1) on the table itself (one copy; what
`to_onnx` writes for fp32/fp16, `onnx_export.share_transposed_constants`). Qwen2.5-0.5B's head (896 × 151936),
random weights, 2 threads, one token (decode) and 128 tokens (prefill), interleaved, median of 15.

    python benchmarks/tied_head_matmul.py   → results/tied_head_matmul.{json,md}
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from common import QWEN25_05B, save_results

ROUNDS = 15


def session(kind: str, table: np.ndarray, folder: Path):
    hidden, vocab = table.shape[1], table.shape[0]
    if kind == "MatMul (transposed copy)":
        node, weight = h.make_node("MatMul", ["x", "w"], ["y"]), nh.from_array(table.T.copy(), "w")
    else:
        node = h.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", transB=1)
        weight = nh.from_array(table, "w")
    graph = h.make_graph(
        [node],
        "head",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", hidden])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", vocab])],
        [weight],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    path = folder / f"{'fused' if 'Fused' in kind else 'matmul'}.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main():
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((QWEN25_05B["vocab_size"], QWEN25_05B["hidden_size"])) * 0.02).astype(np.float32)
    kinds = ["MatMul (transposed copy)", "FusedMatMul transB (the table)"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        sessions = {k: session(k, table, Path(work)) for k in kinds}
        for tokens in (1, 128):
            x = rng.standard_normal((1, tokens, table.shape[1])).astype(np.float32)
            out = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}  # warm-up, and the same numbers
            times = {k: [] for k in kinds}
            for _ in range(ROUNDS):
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"x": x})
                    times[k].append(time.perf_counter() - t)
            base = statistics.median(times[kinds[0]])
            for k in kinds:
                med = statistics.median(times[k])
                diff = float(np.abs(out[k] - out[kinds[0]]).max())
                rows.append(dict(tokens=tokens, form=k, ms=med * 1e3, ratio=med / base, max_abs_diff=diff))
    lines = [
        "# A tied head in ONNX Runtime: transposed copy vs FusedMatMul on the table — Qwen2.5-0.5B head "
        "(896 × 151936), CPU 2 threads, interleaved median of 15",
        "",
        "| tokens | form | ms | × MatMul | max abs diff |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['tokens']} | {r['form']} | {r['ms']:.2f} | {r['ratio']:.3f} | {r['max_abs_diff']:.1e} |" for r in rows
    ]
    lines += ["", f"onnxruntime {ort.__version__}. `python benchmarks/tied_head_matmul.py`."]
    save_results("tied_head_matmul", rows, lines)


if __name__ == "__main__":
    main()
