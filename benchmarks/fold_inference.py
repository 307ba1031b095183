"""Inference after folding: the folded NEAT model vs the untouched base model (issue 4, item 3).

A folded model must cost what the base model costs (W0 + ΔW are plain constants, no adapter op left) and
compute what the unfolded NEAT model computes. Protocol: pre-trained MiniLM-L6 + 2-class head, NEAT on q/v
at rank 8 with B drawn at random (a trained adapter's size; at init B = 0 would make ΔW = 0 and hide any
error), eval mode, no_grad, 2 threads; batch 1 and 32 × 64 tokens (padded rows); the four models interleave
call by call, median of --runs calls. Writes results/fold_inference.{json,md}.

    python benchmarks/fold_inference.py [--runs 50]
"""

from __future__ import annotations

import argparse
import copy

import torch

import neat_fx
from neat_fx.finetune import read_tsv

from common import (
    SST2_DATA,
    Trial,
    build_method,
    encode,
    interleave,
    load_minilm,
    median_of,
    randomise_adapters,
    save_results,
)

LABELS = {
    "base": "base model, untouched (HF eager)",
    "neat": "NEAT, unfolded (eval graph)",
    "folded": "neat_fx.fold (captured graph, W0+ΔW constants)",
    "merged": "merge_into the HF model (eager)",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    tok, model = load_minilm()
    model.eval()
    with torch.no_grad():  # a head of a trained model's size (logits ~ ±3), so the parity figure means something
        model.classifier.weight.normal_(std=0.15)
    base = copy.deepcopy(model)
    rows = read_tsv(SST2_DATA / "test.tsv", 32)
    feeds = {b: encode(tok, (s for s, _ in rows[:b]), args.seq) for b in (1, 32)}
    nm = build_method(Trial("neat", 1e-3), model, feeds[32])
    randomise_adapters(nm)
    nm.eval()
    folded = neat_fx.fold(nm)
    neat_fx.merge_into(model, nm)  # model = the HF model with W0 + ΔW written in
    models = dict(base=base, neat=nm, folded=folded, merged=model)
    out = {}
    with torch.no_grad():
        for b, feed in feeds.items():
            logits = {k: m(**feed).logits for k, m in models.items()}
            scale = logits["neat"].abs().max().item()
            times = interleave(
                {k: (lambda i, m=m, feed=feed: m(**feed)) for k, m in models.items()}, args.runs, 5, f"batch {b}"
            )
            med = median_of(times)
            out[b] = dict(
                median_ms=med,
                ratio_to_base={k: med[k] / med["base"] for k in med},
                max_abs_vs_neat={k: (logits[k] - logits["neat"]).abs().max().item() for k in models},
                logit_scale=scale,
            )
    lines = [
        "# Folded inference vs the base model",
        "",
        f"`python benchmarks/fold_inference.py --runs {args.runs}` — torch {torch.__version__}, {args.threads} "
        f"threads, MiniLM-L6 + head, NEAT q/v r=8 with random B (std 0.05), eval, no_grad, {args.seq} tokens; "
        f"interleaved, median of {args.runs} calls.",
        "",
        "| model | batch 1 (ms) | × base | batch 32 (ms) | × base | max abs Δ logits vs unfolded NEAT (b=32) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in models:
        delta = "—" if k == "neat" else f"{out[32]['max_abs_vs_neat'][k]:.1e}"
        lines.append(
            f"| {LABELS[k]} | {out[1]['median_ms'][k]:.2f} | {out[1]['ratio_to_base'][k]:.3f} | "
            f"{out[32]['median_ms'][k]:.1f} | {out[32]['ratio_to_base'][k]:.3f} | "
            f"{delta} |"
        )
    lines += [
        "",
        f"Logit scale (max |logit|, batch 32): {out[32]['logit_scale']:.2f}. The base row's Δ is ΔW's effect.",
    ]
    save_results("fold_inference", out, lines)


if __name__ == "__main__":
    main()
