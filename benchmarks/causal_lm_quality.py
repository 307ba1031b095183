"""Causal-LM quality of `neat-fx finetune --task causal-lm` on the tiny addition LLaMA (issue 25): the source of
the exact-match and eval-loss figures.

Protocol (tests/lm_fixture.py, shared with tests/test_causal_lm.py): a 2-layer LLaMA (hidden 64) over a
character tokenizer, pre-trained from scratch with fixture seed S (its initial weights and its stream of
training sums) on one thread until greedy exact match on 200 probe sums reaches 30 % (checked every 50 steps);
then the job, as a user runs it (a subprocess of the `neat-fx` CLI): 2000 training sums, 200 eval sums,
all-linear NEAT, 500 steps of 32 rows at lr 1e-2, one thread. Exact match and eval loss before → after are the
job's own printed figures (the 200 eval sums). Pre-training is checked deterministic: seed 0 is built twice and
its weights compared byte for byte.

    python benchmarks/causal_lm_quality.py                 # seeds 0-3 (≈ 3-5 min on the 2-core machine)
    python benchmarks/causal_lm_quality.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import lm_fixture, save_results

STEM = "causal_lm_quality"


def cli() -> list[str]:
    script = Path(sys.executable).with_name("neat-fx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]


def run_seed(fx, root: Path, seed: int) -> dict:
    folder = root / f"seed{seed}"
    info = fx.build_folder(folder, seed=seed)
    digest = fx.weights_digest(folder / "model")
    args = fx.job_args(folder, folder / "run") + ["--save-every", "0"]
    t0 = time.perf_counter()
    r = subprocess.run(cli() + args, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"seed {seed}: the job failed\n{(r.stdout + r.stderr)[-4000:]}")
    rows = fx.table(r.stdout)
    em_before, em_after, n = fx.numbers(rows["exact match before → after"])
    loss_before, _, loss_after, _ = fx.numbers(rows["eval loss (perplexity) before → after"])
    return {
        "seed": seed,
        "pretrain_steps": info["steps"],
        "pretrain_probe_exact_match": info["exact_match"],
        "pretrain_seconds": round(info["seconds"], 1),
        "pretrain_weights_sha256": digest,
        "eval_rows": int(n),
        "exact_match_before": em_before,
        "exact_match_after": em_after,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "training": rows["training"],
        "merged_same_generations": rows["merged + reloaded: same greedy generations"],
        "job_seconds": round(seconds, 1),
        "job_command": "neat-fx " + shlex.join(args).replace(str(folder), "$DIR"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--no-determinism-check", action="store_true", help="skip building seed 0 a second time")
    ap.add_argument("--build-only", metavar="FOLDER", help=argparse.SUPPRESS)  # the determinism check's child
    a = ap.parse_args()
    fx = lm_fixture()
    if a.build_only:
        info = fx.build(Path(a.build_only), fx.PRETRAIN_TARGET, seed=0)
        print(json.dumps({**info, "sha256": fx.weights_digest(Path(a.build_only))}))
        return
    t0 = time.perf_counter()
    results, determinism = [], None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in a.seeds:
            results.append(run_seed(fx, root, seed))
            r = results[-1]
            print(
                f"seed {seed}: pre-training {r['pretrain_steps']} steps; exact match {r['exact_match_before']:.1f} → "
                f"{r['exact_match_after']:.1f} %, eval loss {r['eval_loss_before']:.4f} → {r['eval_loss_after']:.4f}",
                flush=True,
            )
        if not a.no_determinism_check:
            # seed 0 again, in a fresh process (what a second run of the tests or of this script does)
            r = subprocess.run(
                [sys.executable, __file__, "--build-only", str(root / "again")], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise SystemExit(f"the second build failed\n{r.stderr[-4000:]}")
            again = json.loads(r.stdout.strip().splitlines()[-1])
            first = next((r for r in results if r["seed"] == 0), None) or run_seed(fx, root, 0)
            determinism = {
                "seed": 0,
                "how": "seed 0 pre-trained twice, the second time in a fresh process",
                "steps": [first["pretrain_steps"], again["steps"]],
                "probe_exact_match": [first["pretrain_probe_exact_match"], again["exact_match"]],
                "weights_sha256": [first["pretrain_weights_sha256"], again["sha256"]],
            }
            determinism["identical"] = (
                determinism["steps"][0] == determinism["steps"][1]
                and determinism["weights_sha256"][0] == determinism["weights_sha256"][1]
            )
    total = time.perf_counter() - t0
    command = "python benchmarks/causal_lm_quality.py" + (
        "" if a.seeds == [0, 1, 2, 3] else " --seeds " + " ".join(map(str, a.seeds))
    )
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads available (1 used), torch {torch.__version__}"
    data = {
        "command": command,
        "job_command": results[0]["job_command"],
        "machine": machine,
        "python": platform.python_version(),
        "total_seconds": round(total, 1),
        "pretrain_target": fx.PRETRAIN_TARGET,
        "determinism": determinism,
        "runs": results,
    }
    lines = [
        "# Causal-LM quality: neat-fx finetune --task causal-lm on the tiny addition LLaMA",
        "",
        f"Command: `{command}` ({machine}; {total:.0f} s in all). The job, per seed "
        f"($DIR = the seed's folder): `{results[0]['job_command']}`.",
        "",
        "Fixture (tests/lm_fixture.py): 2-layer LLaMA, hidden 64, character tokenizer; pre-trained from scratch on "
        f"one thread until greedy exact match on 200 probe sums ≥ {fx.PRETRAIN_TARGET:.0%} (checked every 50 steps); "
        "the fixture seed sets its initial weights and its pre-training sums. The job: 2000 training sums, "
        "200 eval sums, all-linear NEAT (14 sites), 500 steps × 32 rows, lr 1e-2. Figures are the job's own "
        "printed results (exact match: greedy completion equals the sum; eval loss: mean completion-token loss).",
        "",
        "| fixture seed | pre-training steps (probe EM, time) | exact match before → after (%) | Δ points "
        "| eval loss before → after | after / before | job time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['seed']} | {r['pretrain_steps']} ({100 * r['pretrain_probe_exact_match']:.1f} %, "
            f"{r['pretrain_seconds']:.0f} s) | {r['exact_match_before']:.1f} → {r['exact_match_after']:.1f} "
            f"| {r['exact_match_after'] - r['exact_match_before']:+.1f} "
            f"| {r['eval_loss_before']:.4f} → {r['eval_loss_after']:.4f} "
            f"| {r['eval_loss_after'] / r['eval_loss_before']:.2f} | {r['job_seconds']:.0f} |"
        )
    gains = [r["exact_match_after"] - r["exact_match_before"] for r in results]
    ratios = [r["eval_loss_after"] / r["eval_loss_before"] for r in results]
    lines += [
        "",
        f"Exact-match gain: {min(gains):+.1f} to {max(gains):+.1f} points; eval loss after/before: "
        f"{min(ratios):.2f} to {max(ratios):.2f}.",
    ]
    if determinism:
        verdict = "identical" if determinism["identical"] else "DIFFERENT"
        lines.append(
            f"Determinism: seed 0 pre-trained twice (the second time in a fresh process): "
            f"{determinism['steps'][0]} and {determinism['steps'][1]} steps, "
            f"weights sha256 {determinism['weights_sha256'][0][:16]}… / {determinism['weights_sha256'][1][:16]}…: "
            f"{verdict}."
        )
    save_results(STEM, data, lines)


if __name__ == "__main__":
    main()
