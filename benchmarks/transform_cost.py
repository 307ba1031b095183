"""How long `neat_fx.transform` takes and how much memory (RSS) it adds, and how that compares with one static
`torch.export.export` of the same model on the same inputs (issue 16, point 6: transform ≤ 3× that export).

Two models, random weights:
- llama24: LLaMA-shaped, 24 layers, hidden 256, input_ids (2, 32) — a decoder with batch and sequence dynamic;
- swin: SwinForImageClassification (64×64 images, embed 48, depths 2-2-2, window 4, drop_path_rate 0.1 as in
  Swin's configs), pixel_values (2, 3, 64, 64) — image height/width made torch.export slow when left dynamic.

One fresh process per measurement: `python benchmarks/transform_cost.py`. In each, the first transform is timed
with its RSS (a 'first use' process pays torch.export's one-time costs; a 'warm' one ran a tiny transform first);
warm processes then time `--ratio-repeats` static exports (model in eval mode, `strict=False`) and transforms,
alternating, and report the ratio of the medians. `--cases`, `--repeats` choose less."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from common import rss_mb, save_results

CASES = {
    "llama24": {"patterns": [["*q_proj", "*v_proj"], ["*"]], "what": "LLaMA-shaped, 24 layers, hidden 256"},
    "swin": {"patterns": [["*q_proj", "*v_proj"]], "what": "Swin, 64×64, embed 48, depths 2-2-2"},
}


def build(case: str, layers: int, hidden: int, seq: int):
    """(model, example inputs as kwargs) with random weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    if case == "llama24":
        cfg = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(hidden // 64, 1),
            num_key_value_heads=max(hidden // 64, 1),
            max_position_embeddings=1024,
            use_cache=False,
        )
        return transformers.LlamaForCausalLM(cfg), dict(input_ids=torch.randint(0, 32000, (2, seq)))
    if case == "swin":
        cfg = transformers.SwinConfig(
            image_size=64,
            patch_size=4,
            num_channels=3,
            embed_dim=48,
            depths=[2, 2, 2],
            num_heads=[3, 6, 12],
            window_size=4,
            num_labels=10,
            drop_path_rate=0.1,
        )
        return transformers.SwinForImageClassification(cfg), dict(pixel_values=torch.randn(2, 3, 64, 64))
    raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def static_export_s(model, inputs) -> float:
    import warnings

    import torch

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        torch.export.export(model, (), inputs, strict=False)
        return time.perf_counter() - t0


def one(case: str, layers: int, hidden: int, patterns: list[str], rank: int, seq: int, warm: bool, ratio: int, threads):
    import torch

    import neat_fx

    torch.set_num_threads(threads)
    if warm:  # pay torch.export's one-time costs (imports, caches) on a tiny model first
        tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        neat_fx.transform(tiny, "*", (torch.randn(2, 8),))
    model, inputs = build(case, layers, hidden, seq)
    model.eval()
    with torch.no_grad():
        model(**inputs)  # warm the eager path so transform is not charged for first-call costs
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    nm = neat_fx.transform(model, patterns, inputs, rank=rank)
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()
    # ru_maxrss, as the committed results were made (common.peak_rss_mb reads VmHWM): Linux carries it across
    # fork+exec, but this child's parent starts it before importing torch, so its small peak stays below ours.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    trainable, _ = nm.parameter_counts()
    row = {
        "case": case,
        "warm": warm,
        "patterns": patterns,
        "rank": rank,
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "sites": len(nm.sites()),
        "model_params": params,
        "model_mb_fp32": params * 4 / 2**20,
        "trainable_params": trainable,
        "transform_s": round(seconds, 3),
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_added_mb": round(after - before, 1),
        "peak_rss_mb": round(peak, 1),
    }
    if case == "llama24":
        row.update(layers=layers, hidden=hidden, seq=seq)
    del nm
    if ratio:
        exports, transforms = [], []
        for _ in range(ratio):  # alternating, so drift in the machine's load hits both alike
            gc.collect()
            exports.append(round(static_export_s(model, inputs), 3))
            gc.collect()
            t0 = time.perf_counter()
            nm = neat_fx.transform(model, patterns, inputs, rank=rank)
            transforms.append(round(time.perf_counter() - t0, 3))
            del nm
        row.update(
            static_export_runs_s=exports,
            transform_runs_s=transforms,
            static_export_s=statistics.median(exports),
            transform_median_s=statistics.median(transforms),
            ratio=round(statistics.median(transforms) / statistics.median(exports), 2),
        )
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    ap.add_argument("--ratio-repeats", type=int, default=3, help="static exports and transforms per warm process")
    ap.add_argument("--out", default="transform_cost", help="results/<out>.json and .md")
    ap.add_argument("--warm-only", action="store_true", help="no 'first use' processes")
    ap.add_argument("--runs-from", help="a results JSON of this script: render its runs again instead of measuring")
    ap.add_argument("--before", help="a results JSON of this script run on an earlier library: shown as 'before'")
    ap.add_argument("--before-label", default="", help="what that library was (e.g. its commit)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 by default: on a shared 2-core machine two OpenMP threads make the model runs inside "
        "transform (its checks) many times slower whenever another process holds a core, the export hardly",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--patterns", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        ratio = a.ratio_repeats if a.warm and a.patterns == CASES[a.case]["patterns"][0] else 0
        print(json.dumps(one(a.case, a.layers, a.hidden, a.patterns, a.rank, a.seq, a.warm, ratio, a.threads)))
        return
    cases = [(c, p, w) for c in a.cases for p in CASES[c]["patterns"] for w in (False, True) if w or not a.warm_only]
    if a.runs_from:  # render again from the runs of an earlier invocation, with its meta
        earlier = json.loads(open(a.runs_from).read())
        runs, meta = earlier["runs"], earlier["meta"]
    else:
        runs, meta = measure(a, cases), None
    summary = summarise(runs, cases)
    if meta is None:
        import torch
        import transformers

        import neat_fx

        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "neat_fx_from": os.path.dirname(neat_fx.__file__),
            "threads": a.threads,
            "command": "python benchmarks/transform_cost.py " + " ".join(sys.argv[1:]),
        }
    data = {"meta": meta, "summary": summary, "runs": runs}
    lines = [
        "# transform cost: time, memory, and the ratio to one static torch.export",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['cpus']} CPUs, {meta['threads']} torch thread(s); random weights, rank {a.rank}; median of "
        f"{a.repeats} fresh processes.",
        "",
        "Models: " + "; ".join(f"{c} = {CASES[c]['what']}" for c in a.cases) + ".",
        "First use in a process pays torch.export's one-time costs; 'warm' ran a tiny transform first. The ratio: "
        f"median transform over median static `torch.export.export` (eval mode, same inputs), {a.ratio_repeats} of "
        "each alternating in every warm process.",
        "",
        *table(summary),
    ]
    if a.before:
        before = json.loads(open(a.before).read())
        data["before"] = {"label": a.before_label, **before}
        samples = max((s.get("ratio_samples", 0) for s in before["summary"]), default=0)
        lines += [
            "",
            "## Before: a capture per mode, every dimension `Dim.AUTO`",
            "",
            f"`{before['meta']['command']}` with the library of an earlier commit (`--before-label`: "
            f"{a.before_label}) imported from `{before['meta']['neat_fx_from']}` ahead of the editable install; "
            f"same machine, same session; one process per row, ratio from {samples} sample(s).",
            "",
            *table(before["summary"]),
        ]
    if a.runs_from or a.before:
        data["rendered_with"] = "python benchmarks/transform_cost.py " + " ".join(sys.argv[1:])
        lines += ["", f"Rendered with `{data['rendered_with']}`."]
    save_results(a.out, data, lines, indent=2)


def measure(a, cases) -> list[dict]:
    runs = []
    for i in range(a.repeats):
        for case, patterns, warm in cases:
            cmd = [sys.executable, __file__, "--child", "--case", case, "--patterns", *patterns]
            cmd += ["--layers", str(a.layers), "--hidden", str(a.hidden), "--rank", str(a.rank), "--seq", str(a.seq)]
            cmd += ["--ratio-repeats", str(a.ratio_repeats), "--threads", str(a.threads)] + (["--warm"] if warm else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {i}: {runs[-1]}", flush=True)
    return runs


def summarise(runs: list[dict], cases) -> list[dict]:
    summary = []
    for case, patterns, warm in cases:
        rs = [r for r in runs if r["case"] == case and r["patterns"] == patterns and r["warm"] == warm]
        if not rs:
            continue
        med = lambda k, rs=rs: statistics.median(r[k] for r in rs)  # noqa: E731
        s = {
            "case": case,
            "patterns": " ".join(patterns),
            "warm": warm,
            "sites": rs[0]["sites"],
            "transform_s": med("transform_s"),
            "rss_added_mb": med("rss_added_mb"),
            "model_mb_fp32": round(rs[0]["model_mb_fp32"], 1),
            "trainable_params": rs[0]["trainable_params"],
        }
        if "ratio" in rs[0]:
            exports = [t for r in rs for t in r["static_export_runs_s"]]
            transforms = [t for r in rs for t in r["transform_runs_s"]]
            s.update(
                static_export_s=statistics.median(exports),
                transform_warm_s=statistics.median(transforms),
                ratio=round(statistics.median(transforms) / statistics.median(exports), 2),
                ratio_samples=len(transforms),
            )
        summary.append(s)
    return summary


def table(summary: list[dict]) -> list[str]:
    lines = [
        "| model | patterns | process | sites | transform (s) | RSS added (MB) | model fp32 (MB) | trainable params "
        "| static export (s) | warm transform (s) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        ratio = (
            f"{s['static_export_s']:.2f} | {s['transform_warm_s']:.2f} | **{s['ratio']:.2f}×**"
            if "ratio" in s
            else "– | – | –"
        )
        lines.append(
            f"| {s['case']} | `{s['patterns']}` | {'warm' if s['warm'] else 'first use'} | {s['sites']} | "
            f"{s['transform_s']:.2f} | {s['rss_added_mb']:.1f} | {s['model_mb_fp32']:.1f} | "
            f"{s['trainable_params']:,} | {ratio} |"
        )
    return lines


if __name__ == "__main__":
    main()
