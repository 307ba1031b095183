"""torch.compile: the "neat" backend vs eager NEAT, PEFT LoRA eager and torch.compile(PEFT LoRA) (issue 5).

Training: pre-trained MiniLM-L6 + 2-class head, q/v at rank 8 (+ the head), AdamW, batches of 32 SST-2
sentences padded to 64 tokens; the four set-ups interleave step by step (order rotating), median of --steps
steps after --warmup (compilation happens in the warm-up). Inference: eval + no_grad, batch 1 and 32 × 64,
the compiled NEAT model (folded by the backend) vs the untouched base model compiled with Inductor,
interleaved, median of --runs calls. Writes results/compile_speed.{json,md}.

    python benchmarks/compile_speed.py [--steps 20 --runs 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sst2_common import Trial, build_method, interleave, load_minilm, make_optimizer, train_step  # noqa: E402
from train_speed import fixed_batches  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def median_of(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import neat_fx

    tok, _ = load_minilm()
    data = fixed_batches(tok, args.warmup + args.steps, 32, 64)
    example = data[0][0]

    def make(method):
        torch.manual_seed(0)
        _, model = load_minilm()
        m = build_method(Trial(method, lr=1e-3), model, example)
        m.train()
        return m

    setups = {}
    for label, method, compiled in (("NEAT eager", "neat", False), ("NEAT compiled (backend='neat')", "neat", True),
                                    ("PEFT LoRA eager", "lora", False), ("PEFT LoRA compiled (Inductor)", "lora", True)):
        m = make(method)
        opt, _ = make_optimizer(m, 1e-3, 10_000)
        run = torch.compile(m, backend="neat" if method == "neat" else "inductor") if compiled else m
        setups[label] = (run, opt)
    t0 = time.perf_counter()
    train = median_of(interleave({k: (lambda i, r=r, o=o: train_step(r, o, None, *data[i]))
                                  for k, (r, o) in setups.items()}, args.steps, args.warmup, "training steps"))
    train_wall = time.perf_counter() - t0
    plans = [p.__dict__ for p in neat_fx.compiler.neat.plans]

    # Inference: folded by the backend vs the base model under Inductor.
    torch.manual_seed(0)
    _, base = load_minilm()
    base.eval()
    nm = build_method(Trial("neat", 1e-3), copy.deepcopy(base), example)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.05)
    nm.eval()
    infer = {}
    with torch.no_grad():
        neat_c, base_c = torch.compile(nm, backend="neat"), torch.compile(base, backend="inductor")
        for b in (1, 32):
            feed = {k: v[:b] for k, v in data[0][0].items()}
            parity = float((neat_c(**feed).logits - nm(**feed).logits).abs().max())
            med = median_of(interleave({"NEAT compiled (folded)": lambda i: neat_c(**feed),
                              "base model compiled (Inductor)": lambda i: base_c(**feed),
                              "NEAT eager (unfolded)": lambda i: nm(**feed)}, args.runs, 3, f"inference b={b}"))
            infer[b] = dict(median_ms=med, parity_vs_eager_neat=parity)
    lora_eager = train["PEFT LoRA eager"]
    lines = ["# torch.compile: backend 'neat' vs eager and PEFT LoRA", "",
             f"`python benchmarks/compile_speed.py --steps {args.steps} --runs {args.runs}` — torch {torch.__version__}, "
             f"{args.threads} threads, MiniLM-L6 + head, q/v r=8, batch 32×64, AdamW; interleaved medians "
             f"(training {args.steps} steps after {args.warmup} warm-up, {train_wall:.0f} s in all incl. compilation).",
             "", "## Training step", "", "| set-up | median step (ms) | × PEFT LoRA eager |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.1f} | {v / lora_eager:.3f} |" for k, v in train.items()]
    lines += ["", "Sites lowered by the backend (training graph): " + ", ".join(
        sorted({p['form'] for p in plans})) + f" ({len(plans)} sites)", "",
              "## Inference (eval, no_grad)", "",
              "| set-up | batch 1 (ms) | × base compiled | batch 32 (ms) | × base compiled |", "| --- | --- | --- | --- | --- |"]
    for k in infer[1]["median_ms"]:
        a, b = infer[1]["median_ms"][k], infer[32]["median_ms"][k]
        lines.append(f"| {k} | {a:.2f} | {a / infer[1]['median_ms']['base model compiled (Inductor)']:.3f} | {b:.1f} | "
                     f"{b / infer[32]['median_ms']['base model compiled (Inductor)']:.3f} |")
    lines += ["", f"max |Δ logits| compiled-folded vs eager NEAT: {infer[1]['parity_vs_eager_neat']:.1e} (b=1), "
                  f"{infer[32]['parity_vs_eager_neat']:.1e} (b=32)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile_speed.json").write_text(json.dumps(dict(train_ms=train, plans=plans, inference=infer,
                                                                args=vars(args), torch=torch.__version__), indent=1))
    (RESULTS / "compile_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
