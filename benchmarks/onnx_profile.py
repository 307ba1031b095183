"""Where ONNX Runtime spends its time: per-op kernel totals of one or more ONNX files, same inputs.

Each file runs in a fresh process (ONNX Runtime's worker threads slow whatever shares the process), with
ORT_ENABLE_ALL, 2 intra-op threads and the options our files record; the profiler's per-node kernel times are
summed by (op, input shapes) and divided by the number of runs. Padded MiniLM-style inputs: input_ids,
attention_mask (and token_type_ids where the graph takes it), sequence 64. `--matmul-alpha` instead times a
one-node MatMul against a FusedMatMul with alpha on q·kᵀ's shapes (MiniLM, batch 32).

    python benchmarks/onnx_profile.py ours.onnx optimum.onnx [--batch 32 --runs 40 --top 14]
    python benchmarks/onnx_profile.py --matmul-alpha

(How results/onnx_profile_ab.log was made, with the files `onnx_latency.py --build ROUTE DIR` writes.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def profile(path: str, batch: int, runs: int, top: int) -> str:
    import numpy as np
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort_profile")
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    disabled = [s for s in meta.get("neat_fx.ort.disabled_optimizers.cpu", "").split(",") if s]
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or None)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, 64))
    mask = np.ones((batch, 64), dtype=np.int64)
    for i, n in enumerate(rng.integers(16, 65, batch)):
        mask[i, n:] = 0 if i else 1
    names = {i.name for i in sess.get_inputs()}
    feed = {
        k: v
        for k, v in dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids)).items()
        if k in names
    }
    warm = 5
    for _ in range(warm):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.unlink(trace)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            shapes = [list(d.values())[0] for d in e["args"].get("input_type_shape", [])]
            key = (e["args"]["op_name"], str(shapes))
            total[key] += e["dur"]
            count[key] += 1
    n = warm + runs
    lines = [f"{path}: batch {batch}, median of {runs} runs {statistics.median(times) * 1e3:.1f} ms"]
    lines += [
        f"  {op:20s} {us / n / 1e3:7.2f} ms/run  ×{count[(op, sh)] // n:<3d} {sh[:100]}"
        for (op, sh), us in total.most_common(top)
    ]
    return "\n".join(lines)


def matmul_alpha(calls: int = 200) -> str:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def model(fused: bool) -> bytes:
        a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [32, 12, 64, 32])
        b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [32, 12, 32, 64])
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
        node = (
            helper.make_node("FusedMatMul", ["A", "B"], ["Y"], domain="com.microsoft", alpha=0.17677)
            if fused
            else helper.make_node("MatMul", ["A", "B"], ["Y"])
        )
        graph = helper.make_graph([node], "g", [a, b], [y])
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        ).SerializeToString()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sessions = {
        k: ort.InferenceSession(model(k == "FusedMatMul(alpha)"), so, providers=["CPUExecutionProvider"])
        for k in ("MatMul", "FusedMatMul(alpha)")
    }
    feed = {
        "A": np.random.rand(32, 12, 64, 32).astype(np.float32),
        "B": np.random.rand(32, 12, 32, 64).astype(np.float32),
    }
    times = {k: [] for k in sessions}
    for _ in range(calls):  # alternating
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return "  ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in times.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--matmul-alpha", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.matmul_alpha:
        print(matmul_alpha())
        return
    if not a.files:
        ap.error("name one or more ONNX files (or --matmul-alpha)")
    if a.child:
        print(profile(a.files[0], a.batch, a.runs, a.top))
        return
    for f in a.files:  # one fresh process each
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                f,
                "--batch",
                str(a.batch),
                "--runs",
                str(a.runs),
                "--top",
                str(a.top),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
