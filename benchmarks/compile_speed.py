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
import time

import torch

from common import (
    Trial,
    build_method,
    fixed_batches,
    interleave,
    load_minilm,
    median_of,
    random_batches,
    random_minilm,
    randomise_adapters,
    save_results,
    speed_setup,
    train_step,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASE_COMPILED = "base model compiled (Inductor)"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser()
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device (run it on a GPU machine, or leave --device out)")
    return args


def argument_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument(
        "--random-init",
        action="store_true",
        help="MiniLM-L6's shape with random weights and random tokens (no model package or data needed)",
    )
    return ap


def training_batches(args, dev) -> list:
    """warmup + steps (inputs, labels) batches of 32 × 64 tokens on `dev`: SST-2 sentences, or random ids."""
    if args.random_init:
        data = random_batches(args.warmup + args.steps, 32, 64)
    else:
        tok, _ = load_minilm()
        data = fixed_batches(tok, args.warmup + args.steps, 32, 64)
    return [({k: v.to(dev) for k, v in x.items()}, y.to(dev)) for x, y in data]


def base_model(args):
    """The model every set-up starts from (seeded, so each gets the same head), on the device and dtype."""
    torch.manual_seed(0)
    model = random_minilm() if args.random_init else load_minilm()[1]
    return model.to(torch.device(args.device), DTYPES[args.dtype])


def training_setups(args, example: dict) -> dict:
    """label → (module to step, its optimizer): eager and compiled NEAT and PEFT LoRA (+ CUDA graphs on a GPU)."""
    from torch._inductor.compile_fx import compile_fx

    import neat_fx

    def neat_cudagraphs():  # the "neat" backend handing its lowered graph to Inductor with CUDA graphs on
        return neat_fx.backend(inner=lambda gm, ex: compile_fx(gm, ex, config_patches={"triton.cudagraphs": True}))

    variants = [
        ("NEAT eager", "neat", None),
        ("NEAT compiled (backend='neat')", "neat", dict(backend="neat")),
        ("PEFT LoRA eager", "lora", None),
        ("PEFT LoRA compiled (Inductor)", "lora", dict(backend="inductor")),
    ]
    if args.device == "cuda":
        variants += [
            ("NEAT compiled (backend='neat', Inductor + CUDA graphs)", "neat", dict(backend=neat_cudagraphs())),
            ("PEFT LoRA compiled (mode='reduce-overhead')", "lora", dict(mode="reduce-overhead")),
        ]
    setups = {}
    for label, method, how in variants:
        m, opt = speed_setup(method, base_model(args), example)
        setups[label] = (torch.compile(m, **how) if how else m, opt)
    return setups


def measure_training(setups: dict, data: list, args, sync) -> tuple[dict, float, list[dict]]:
    """(median step ms per set-up, wall seconds incl. compilation, the backend's site plans)."""
    import neat_fx

    t0 = time.perf_counter()
    train = median_of(
        interleave(
            {k: (lambda i, r=r, o=o: train_step(r, o, None, *data[i])) for k, (r, o) in setups.items()},
            args.steps,
            args.warmup,
            "training steps",
            sync,
        )
    )
    return train, time.perf_counter() - t0, [p.__dict__ for p in neat_fx.compiler.neat.plans]


def measure_inference(args, example: dict, sync) -> dict:
    """Batch 1 and 32: the NEAT model (random B) compiled by the backend (folded) vs the base model under
    Inductor vs eager NEAT; median ms and the compiled-vs-eager parity."""
    base = base_model(args)
    base.eval()
    nm = build_method(Trial("neat", 1e-3), copy.deepcopy(base), example)
    randomise_adapters(nm)
    nm.eval()
    infer = {}
    with torch.no_grad():
        neat_c, base_c = torch.compile(nm, backend="neat"), torch.compile(base, backend="inductor")
        for b in (1, 32):
            feed = {k: v[:b] for k, v in example.items()}
            parity = float((neat_c(**feed).logits - nm(**feed).logits).abs().max())
            med = median_of(
                interleave(
                    {
                        "NEAT compiled (folded)": lambda i, feed=feed: neat_c(**feed),
                        BASE_COMPILED: lambda i, feed=feed: base_c(**feed),
                        "NEAT eager (unfolded)": lambda i, feed=feed: nm(**feed),
                    },
                    args.runs,
                    3,
                    f"inference b={b}",
                    sync,
                )
            )
            infer[b] = dict(median_ms=med, parity_vs_eager_neat=parity)
    return infer


def where(args) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, {args.dtype}"
    return f"CPU, {args.threads} threads, {args.dtype}"


def report(args, train: dict, train_wall: float, plans: list[dict], infer: dict) -> list[str]:
    """The markdown lines of results/compile_speed*.md."""
    defaults = argument_parser()
    flags = "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in (("device", args.device), ("dtype", args.dtype))
        if v != defaults.get_default(k)
    ) + (" --random-init" if args.random_init else "")
    weights = (
        "random weights of MiniLM-L6's shape, random tokens" if args.random_init else "pre-trained MiniLM-L6, SST-2"
    )
    lora_eager = train["PEFT LoRA eager"]
    lines = [
        "# torch.compile: backend 'neat' vs eager and PEFT LoRA",
        "",
        f"`python benchmarks/compile_speed.py --steps {args.steps} --runs {args.runs}{flags}` — torch "
        f"{torch.__version__}, {where(args)}; {weights} + head, q/v r=8, batch 32×64, AdamW; interleaved medians "
        f"(training {args.steps} steps after {args.warmup} warm-up, {train_wall:.0f} s in all incl. compilation).",
        "",
        "## Training step",
        "",
        "| set-up | median step (ms) | × PEFT LoRA eager |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v:.1f} | {v / lora_eager:.3f} |" for k, v in train.items()]
    lines += [
        "",
        "Sites lowered by the backend (training graph): "
        + ", ".join(sorted({p["form"] for p in plans}))
        + f" ({len(plans)} sites)",
        "",
        "## Inference (eval, no_grad)",
        "",
        "| set-up | batch 1 (ms) | × base compiled | batch 32 (ms) | × base compiled |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k in infer[1]["median_ms"]:
        a, b = infer[1]["median_ms"][k], infer[32]["median_ms"][k]
        lines.append(
            f"| {k} | {a:.2f} | {a / infer[1]['median_ms'][BASE_COMPILED]:.3f} | {b:.1f} | "
            f"{b / infer[32]['median_ms'][BASE_COMPILED]:.3f} |"
        )
    lines += [
        "",
        f"max |Δ logits| compiled-folded vs eager NEAT: {infer[1]['parity_vs_eager_neat']:.1e} (b=1), "
        f"{infer[32]['parity_vs_eager_neat']:.1e} (b=32).",
    ]
    return lines


def write_results(args, train: dict, plans: list[dict], infer: dict, lines: list[str]):
    stem = f"compile_speed_cuda_{args.dtype}" if args.device == "cuda" else "compile_speed"
    save_results(
        stem,
        dict(
            train_ms=train, plans=plans, inference=infer, args=vars(args), torch=torch.__version__, device=where(args)
        ),
        lines,
    )


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    data = training_batches(args, torch.device(args.device))
    example = data[0][0]
    train, train_wall, plans = measure_training(training_setups(args, example), data, args, sync)
    infer = measure_inference(args, example, sync)
    write_results(args, train, plans, infer, report(args, train, train_wall, plans, infer))


if __name__ == "__main__":
    main()
