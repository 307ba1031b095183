"""How long `neat_fx.transform` takes and how much memory (RSS) it adds, on a 24-layer LLaMA-shaped model
(hidden 256, random weights). One fresh process per measurement: python benchmarks/transform_cost.py"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

from common import rss_mb, save_results


def one(layers: int, hidden: int, patterns: list[str], rank: int, seq: int, warm: bool) -> dict:
    import torch
    import transformers

    import neat_fx

    torch.manual_seed(0)
    torch.set_num_threads(2)
    if warm:  # pay torch.export's one-time costs (imports, caches) on a tiny model first
        tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        neat_fx.transform(tiny, "*", (torch.randn(2, 8),))
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
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 32000, (2, seq))
    with torch.no_grad():
        model(input_ids=ids)  # warm the eager path so transform is not charged for first-call costs
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    nm = neat_fx.transform(model, patterns, dict(input_ids=ids), rank=rank)
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()
    # ru_maxrss, as the committed results were made (common.peak_rss_mb reads VmHWM): Linux carries it across
    # fork+exec, but this child's parent starts it before importing torch, so its small peak stays below ours.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    trainable, _ = nm.parameter_counts()
    return {
        "warm": warm,
        "layers": layers,
        "hidden": hidden,
        "patterns": patterns,
        "rank": rank,
        "seq": seq,
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


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--patterns", nargs="+", default=["*q_proj", "*v_proj"])
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.layers, a.hidden, a.patterns, a.rank, a.seq, a.warm)))
        return
    runs = []
    cases = [(p, w) for p in (a.patterns, ["*"]) for w in (False, True)]
    for i in range(a.repeats):
        for patterns, warm in cases:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--layers",
                str(a.layers),
                "--hidden",
                str(a.hidden),
                "--rank",
                str(a.rank),
                "--seq",
                str(a.seq),
                "--patterns",
                *patterns,
            ] + (["--warm"] if warm else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"run {i}: {runs[-1]}", flush=True)
    import torch
    import transformers

    summary = []
    for patterns, warm in cases:
        rs = [r for r in runs if r["patterns"] == patterns and r["warm"] == warm]
        med = lambda k, rs=rs: sorted(r[k] for r in rs)[len(rs) // 2]  # noqa: E731
        summary.append(
            {
                "patterns": " ".join(patterns),
                "warm": warm,
                "sites": rs[0]["sites"],
                "transform_s": med("transform_s"),
                "rss_added_mb": med("rss_added_mb"),
                "model_mb_fp32": round(rs[0]["model_mb_fp32"], 1),
                "trainable_params": rs[0]["trainable_params"],
            }
        )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": 2,
        "command": "python benchmarks/transform_cost.py " + " ".join(sys.argv[1:]),
    }
    lines = [
        f"# transform cost: LLaMA-shaped, {a.layers} layers, hidden {a.hidden}, random weights, rank {a.rank}",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['cpus']} CPUs; median of {a.repeats} fresh processes.",
        "",
        "First use in a process pays torch.export's one-time costs; 'warm' ran a tiny transform first.",
        "",
        "| patterns | process | sites | transform (s) | RSS added (MB) | model fp32 (MB) | trainable params |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| `{s['patterns']}` | {'warm' if s['warm'] else 'first use'} | {s['sites']} | "
            f"{s['transform_s']:.2f} | {s['rss_added_mb']:.1f} | "
            f"{s['model_mb_fp32']:.1f} | {s['trainable_params']:,} |"
        )
    save_results("transform_cost", {"meta": meta, "summary": summary, "runs": runs}, lines, indent=2)


if __name__ == "__main__":
    main()
