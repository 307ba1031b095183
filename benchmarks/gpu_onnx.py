"""On a lent GPU: ONNX Runtime's CUDA EP vs PyTorch CUDA eager on the same card (issue 3's GPU row).

A MiniLM-L6-shaped BERT (random weights: the model package does not travel to the GPU machine) with a
2-class head, exported by `neat_fx.export.to_onnx(device="cuda")` in fp32 and fp16, with optimize="auto"
(ONNX Runtime graph optimisations + transformer fusions on CUDA) and optimize="exporter" (the exporter's own
graph only); each verified by the export on the CUDA EP (fp32 ≤ 1e-4, fp16 ≤ 1e-2 of each output's scale).
Latency: batch 1 and 32 × 64 tokens (padded), ORT through IOBinding (inputs and outputs stay on the card)
vs the PyTorch model of the same dtype, interleaved, median of --runs calls. Without a CUDA EP it says so.
Writes results/gpu_onnx_<card>.{json,md}.

    python benchmarks/gpu_onnx.py [--runs 100]      (--device cpu: a dry run of the script on the CPU EP)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import interleave, random_minilm, random_tokens, save_results


def batch(b: int, seq: int = 64) -> dict:
    """Padded random ids (lengths 16–seq) seeded by the batch size; input_ids and attention_mask only."""
    return random_tokens(b, seq, b, token_type_ids=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("this torch sees no CUDA device: run on a GPU machine, or --device cpu for a dry run")
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels that torch brought
        ort.preload_dlls()
    from neat_fx.export import BoundRunner, session, to_onnx

    card = torch.cuda.get_device_name() if dev == "cuda" else "CPU dry run"
    res = {
        "device": card,
        "providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "runs": args.runs,
        "rows": [],
    }
    if dev == "cuda" and "CUDAExecutionProvider" not in res["providers"]:
        print(json.dumps(res, indent=1))
        sys.exit("this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (neat-fx[gpu])")
    torch.manual_seed(0)
    base = random_minilm().eval()
    folder = Path(tempfile.mkdtemp())
    sync = torch.cuda.synchronize if dev == "cuda" else None
    ep = "CUDA EP" if dev == "cuda" else "CPU EP"
    for dtype in ("fp32", "fp16"):
        model = base.to(dev, torch.float16 if dtype == "fp16" else torch.float32)
        fns, rows = {}, {}
        with torch.no_grad():
            for b in (1, 32):
                xc = {k: v.to(dev) for k, v in batch(b).items()}
                fns[f"PyTorch eager|{b}"] = lambda i, xc=xc, m=model: m(**xc)
            for optimize in ("auto", "exporter"):
                t = time.perf_counter()
                rep = to_onnx(
                    model,
                    {k: v.to(dev) for k, v in batch(2).items()},
                    folder / f"{dtype}-{optimize}.onnx",
                    dtype=dtype,
                    optimize=optimize,
                    device=dev,
                )
                label = f"neat_fx to_onnx, ORT {ep} (optimize='{optimize}')"
                rows[label] = dict(
                    export_s=round(time.perf_counter() - t, 1),
                    parity_max_rel=rep.max_rel_diff,
                    parity=rep.parity,
                    fused_ops=rep.fused_ops,
                    verified_on=rep.device,
                    optimizations=rep.optimizations,
                )
                print(rep, flush=True)
                sess = session(rep.path, dev)
                for b in (1, 32):
                    runner = BoundRunner(sess, {k: v.numpy() for k, v in batch(b).items()}, dev)
                    fns[f"{label}|{b}"] = lambda i, r=runner: r()
            times = interleave(fns, args.runs, 10, f"{dtype} latency", sync)
        rows["PyTorch eager"] = {}
        for key, ts in times.items():
            label, b = key.split("|")
            rows[label][f"b{b}_ms"] = round(statistics.median(ts), 4)
        for label, row in rows.items():
            for b in (1, 32):
                row[f"x_torch_b{b}"] = round(row[f"b{b}_ms"] / rows["PyTorch eager"][f"b{b}_ms"], 3)
            res["rows"].append(dict(dtype=dtype, route=label, **row))
        print(json.dumps(rows, default=str), flush=True)
    write(res)


def write(res: dict):
    lines = [
        f"# ONNX Runtime CUDA EP vs PyTorch CUDA eager: MiniLM-L6 shape, sequence 64, {res['device']}",
        "",
        f"`python benchmarks/gpu_onnx.py --runs {res['runs']}` on a lent GPU machine — torch {res['torch']}, "
        f"onnxruntime-gpu {res['onnxruntime']}; random weights, padded batches; ORT through IOBinding; "
        f"interleaved, median of {res['runs']} calls. Parity: max relative difference from PyTorch of the same "
        "dtype on the CUDA EP, over the export's two verification batches.",
        "",
        "| dtype | route | batch 1 (ms) | batch 32 (ms) | × PyTorch (1 / 32) | parity (max rel) | fused ops |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        fused = ", ".join(f"{k} ×{v}" for k, v in sorted(r.get("fused_ops", {}).items())) or "—"
        parity = f"{r['parity_max_rel']:.1e}" if "parity_max_rel" in r else "—"
        lines.append(
            f"| {r['dtype']} | {r['route']} | {r['b1_ms']:.3f} | {r['b32_ms']:.3f} | "
            f"{r['x_torch_b1']:.2f} / {r['x_torch_b32']:.2f} | {parity} | {fused} |"
        )
    stem = "gpu_onnx_" + res["device"].split()[-1].lower().replace("run", "run_cpu")
    save_results(stem, res, lines)


if __name__ == "__main__":
    main()
