"""Where a decode step goes: ONNX Runtime's per-op kernel times of with-past decoder files (ours, the builder's)
at the same point of a generation — a prompt of `--prompt` random tokens (batch 1), then `--steps` decode steps
of one token, the cache bound between steps as generation does; the profiler's node times of the decode steps
summed by op type, per step. Each file in its own process, 2 intra-op threads, the options the file records.
Also the node count and the wall time per decode step (with the profiler on: relative, not absolute).

    python benchmarks/decoder_onnx_profile.py WORK/ours_int4/model.onnx WORK/genai_int4/model.onnx
    (WORK: decoder_onnx.py --work WORK; the genai folders' model.onnx takes the same inputs, minus position_ids)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time


def profile(path: str, prompt: int, steps: int, head_size: int) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    nodes = len(onnx.load(path, load_external_data=False).graph.node)
    disabled = [s for s in meta.get("neat_fx.ort.disabled_optimizers.cpu", "").split(",") if s]
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort_profile")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or None)
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    past = sorted(n for n in inputs if n.startswith("past_key_values."))
    ids_type = np.int32 if inputs["input_ids"].type == "tensor(int32)" else np.int64
    mask_type = np.int32 if inputs["attention_mask"].type == "tensor(int32)" else np.int64
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (1, prompt))
    # the builder names the head size axis (kv_cache_dim)
    dim = {n: inputs[n].shape[3] if isinstance(inputs[n].shape[3], int) else head_size for n in past}
    cache = {n: np.zeros((1, inputs[n].shape[1], 0, dim[n]), np.float32) for n in past}
    length = 0
    marks = []
    for _ in range(steps + 1):
        length += ids.shape[1]
        feed = {"input_ids": ids.astype(ids_type), "attention_mask": np.ones((1, length), mask_type)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(length - ids.shape[1], length)[None].astype(np.int64)
        feed.update(cache)
        t = time.perf_counter()
        got = dict(zip(outputs, sess.run(None, feed)))
        marks.append((time.perf_counter() - t, length))
        cache = {n: got[n.replace("past_key_values.", "present.", 1)] for n in past}
        ids = got["logits"][:, -1:].argmax(-1)
    trace = json.load(open(sess.end_profiling()))
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_start = runs[1]["ts"]  # the first run is the prompt
    per_op = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            per_op[e["args"]["op_name"]] += e["dur"] / steps / 1e3
    return {
        "file": path,
        "nodes": nodes,
        "prefill_ms": 1e3 * marks[0][0],
        "decode_ms_per_step": 1e3 * sum(m[0] for m in marks[1:]) / steps,
        "kernel_ms_per_step": sum(per_op.values()),
        "per_op_ms_per_step": dict(per_op.most_common()),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--head-size", type=int, default=64, help="where a file names the cache's head-size axis")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(profile(args.files[0], args.prompt, args.steps, args.head_size)))
        return
    results = []
    for f in args.files:
        cmd = [sys.executable, __file__, f, "--child", "--prompt", str(args.prompt), "--steps", str(args.steps)]
        cmd += ["--head-size", str(args.head_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ops = list(dict.fromkeys(op for r in results for op in r["per_op_ms_per_step"]))
    print(
        "| op (ms per decode step) | "
        + " | ".join(os.path.basename(os.path.dirname(r["file"])) for r in results)
        + " |"
    )
    print("|---|" + "---:|" * len(results))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{r['per_op_ms_per_step'].get(op, 0):.2f}" for r in results) + " |")
    for key in ("kernel_ms_per_step", "decode_ms_per_step", "prefill_ms", "nodes"):
        print(f"| **{key}** | " + " | ".join(f"{r[key]:.1f}" for r in results) + " |")


if __name__ == "__main__":
    main()
