"""torch.compile: the "neat" backend vs eager NEAT, PEFT LoRA eager and torch.compile(PEFT LoRA) (issue 5).

Training: pre-trained MiniLM-L6 + 2-class head, q/v at rank 8 (+ the head), AdamW, batches of 32 SST-2
sentences padded to 64 tokens; the four set-ups interleave step by step (order rotating), median of --steps
steps after --warmup (compilation happens in the warm-up). Inference: eval + no_grad, batch 1 and 32 × 64,
the compiled NEAT model (folded by the backend) vs the untouched base model compiled with Inductor,
interleaved, median of --runs calls. Writes results/compile_speed.{json,md}.

On a GPU (`--device cuda`, e.g. a lent machine without the model package or the data: add --random-init for
MiniLM-L6's shape with random weights and random token ids) it also times CUDA graphs: Inductor with
`triton.cudagraphs` inside the "neat" backend, and PEFT LoRA under mode="reduce-overhead". Writes
results/compile_speed_cuda_<dtype>.{json,md}.

    python benchmarks/compile_speed.py [--steps 20 --runs 30]
    python benchmarks/compile_speed.py --device cuda --dtype bf16 --random-init
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_minilm():
    """MiniLM-L6's architecture (all-MiniLM-L6-v2's config) with random weights and a 2-class head."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def random_batches(n: int, batch: int, max_len: int):
    """n (inputs, labels) batches of random token ids, padded after a random length in [8, max_len]."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 30000, (batch, max_len), generator=g)
        lengths = torch.randint(8, max_len + 1, (batch, 1), generator=g)
        mask = (torch.arange(max_len) < lengths).long()
        out.append((dict(input_ids=ids * mask, token_type_ids=torch.zeros_like(ids), attention_mask=mask),
                    torch.randint(0, 2, (batch,), generator=g)))
    return out


def median_of(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--random-init", action="store_true",
                    help="MiniLM-L6's shape with random weights and random tokens (no model package or data needed)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device (run it on a GPU machine, or leave --device out)")
    torch.set_num_threads(args.threads)
    import neat_fx

    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    if args.random_init:
        data = random_batches(args.warmup + args.steps, 32, 64)
    else:
        tok, _ = load_minilm()
        data = fixed_batches(tok, args.warmup + args.steps, 32, 64)
    data = [({k: v.to(dev) for k, v in x.items()}, y.to(dev)) for x, y in data]
    example = data[0][0]

    def base_model():
        torch.manual_seed(0)
        model = random_minilm() if args.random_init else load_minilm()[1]
        return model.to(dev, dtype)

    def make(method):
        m = build_method(Trial(method, lr=1e-3), base_model(), example)
        m.train()
        return m

    from torch._inductor.compile_fx import compile_fx

    def neat_cudagraphs():  # the "neat" backend handing its lowered graph to Inductor with CUDA graphs on
        return neat_fx.backend(inner=lambda gm, ex: compile_fx(gm, ex, config_patches={"triton.cudagraphs": True}))

    variants = [("NEAT eager", "neat", None), ("NEAT compiled (backend='neat')", "neat", dict(backend="neat")),
                ("PEFT LoRA eager", "lora", None), ("PEFT LoRA compiled (Inductor)", "lora", dict(backend="inductor"))]
    if cuda:
        variants += [("NEAT compiled (backend='neat', Inductor + CUDA graphs)", "neat",
                      dict(backend=neat_cudagraphs())),
                     ("PEFT LoRA compiled (mode='reduce-overhead')", "lora", dict(mode="reduce-overhead"))]
    setups = {}
    for label, method, how in variants:
        m = make(method)
        opt, _ = make_optimizer(m, 1e-3, 10_000)
        setups[label] = (torch.compile(m, **how) if how else m, opt)
    t0 = time.perf_counter()
    train = median_of(interleave({k: (lambda i, r=r, o=o: train_step(r, o, None, *data[i]))
                                  for k, (r, o) in setups.items()}, args.steps, args.warmup, "training steps", sync))
    train_wall = time.perf_counter() - t0
    plans = [p.__dict__ for p in neat_fx.compiler.neat.plans]

    # Inference: folded by the backend vs the base model under Inductor.
    base = base_model()
    base.eval()
    nm = build_method(Trial("neat", 1e-3), copy.deepcopy(base), example)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g).to(ad.B) * 0.05)
    nm.eval()
    infer = {}
    with torch.no_grad():
        neat_c, base_c = torch.compile(nm, backend="neat"), torch.compile(base, backend="inductor")
        for b in (1, 32):
            feed = {k: v[:b] for k, v in data[0][0].items()}
            parity = float((neat_c(**feed).logits - nm(**feed).logits).abs().max())
            med = median_of(interleave({"NEAT compiled (folded)": lambda i: neat_c(**feed),
                              "base model compiled (Inductor)": lambda i: base_c(**feed),
                              "NEAT eager (unfolded)": lambda i: nm(**feed)}, args.runs, 3, f"inference b={b}", sync))
            infer[b] = dict(median_ms=med, parity_vs_eager_neat=parity)
    lora_eager = train["PEFT LoRA eager"]
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("device", args.device), ("dtype", args.dtype))
                    if v != ap.get_default(k)) + (" --random-init" if args.random_init else "")
    where = (f"{torch.cuda.get_device_name()}, {args.dtype}" if cuda else f"CPU, {args.threads} threads, {args.dtype}")
    weights = ("random weights of MiniLM-L6's shape, random tokens" if args.random_init
               else "pre-trained MiniLM-L6, SST-2")
    lines = ["# torch.compile: backend 'neat' vs eager and PEFT LoRA", "",
             f"`python benchmarks/compile_speed.py --steps {args.steps} --runs {args.runs}{flags}` — torch "
             f"{torch.__version__}, {where}; {weights} + head, q/v r=8, batch 32×64, AdamW; interleaved medians "
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
    stem = f"compile_speed_cuda_{args.dtype}" if cuda else "compile_speed"
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(train_ms=train, plans=plans, inference=infer, args=vars(args),
                                                          torch=torch.__version__, device=where), indent=1))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
