"""Many NEAT adapters on one onnxruntime-genai builder model (issue 23, item 7): switch time and decode speed.

The export is the library's: `to_onnx(model, None, folder, via="genai", adapters={"a0": nm_0, …})` saves each NEAT
adapter in its exact LoRA form (lora_A = Hᵀ, lora_B = B), runs onnxruntime-genai's builder once per adapter (its
`adapter_path` option: LoRA MatMul pairs beside each base MatMul, the LoRA matrices as initializers), keeps the first
build as the base with its LoRA initializers turned into graph inputs (zero defaults: no adapter active = the base
model), writes `adapters/<name>.onnx_adapter` per adapter and verifies each adapter's greedy tokens in
onnxruntime-genai against its merged model (neat_fx/export/genai_adapters.py). The runtime switches adapters with
`og.Adapters(model).load(file, name)` + `Generator.set_active_adapter(adapters, name)` (what
`neat_fx.export.GenaiAdapters` holds).

This script measures, in onnxruntime-genai: greedy tokens of each adapter vs `neat_fx.generate(nm_i)` (the same
prompt), the time to switch adapters, prefill and decode speed with an adapter active vs the single merged model
built by the builder (`to_onnx(fold(nm_0), None, dir, via="genai")`).

    python benchmarks/genai_multi_lora.py                  # Qwen2.5-0.5B shape, 4 layers, 3 adapters (≈ 3 min)
    python benchmarks/genai_multi_lora.py --layers 24      # the full depth
    python benchmarks/genai_multi_lora.py --small          # hidden 64: a check of the mechanism (seconds)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import QWEN25_05B, randomise_adapters, save_results

STEM = "genai_multi_lora"


#: --small: a quick check of the mechanism (seconds), not a measurement
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    bos_token_id=1,
    eos_token_id=2,
)


def build_model(layers: int, small: bool):
    import torch
    import transformers as T

    torch.manual_seed(0)
    shape = dict(QWEN25_05B, num_hidden_layers=layers, **(SMALL if small else {}))
    cfg = T.Qwen2Config(**shape, use_cache=False)
    return T.Qwen2ForCausalLM(cfg).eval()


def generate_genai(model, ids, new: int, adapters=None, name=None, threads: int = 2):
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    if adapters is not None:
        gen.set_active_adapter(adapters, name)
    t1 = time.perf_counter()
    gen.append_tokens(ids.astype(np.int32))
    stamps = []
    while not gen.is_done():
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    tokens = gen.get_sequence(0).tolist()[ids.shape[1] :]
    decode = [b - a for a, b in zip(stamps, stamps[1:])]
    return tokens, t1 - t0, stamps[0] - t1, statistics.mean(decode) if decode else float("nan")


def set_threads(folder: Path, threads: int):
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    path.write_text(json.dumps(cfg, indent=4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="hidden 64, vocabulary 1000: a quick check")
    args = ap.parse_args()

    import onnxruntime_genai as og
    import torch

    import neat_fx
    from neat_fx.export import GenaiAdapters, to_onnx

    torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.small)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    example = dict(input_ids=torch.randint(0, vocab, (2, 16), generator=g))
    ids = torch.randint(0, vocab, (1, args.prompt), generator=g)
    nms = []
    for i in range(args.adapters):
        nm = neat_fx.transform(model, "all-linear", example, rank=args.rank, modes=("eval",), seed=i)
        randomise_adapters(nm, std=0.05, seed=100 + i)
        nms.append(nm)

    work = Path(tempfile.mkdtemp(prefix="genai-lora-"))
    try:
        base = work / "base"
        t = time.perf_counter()
        report = to_onnx(model, None, base, via="genai", adapters={f"a{i}": nm for i, nm in enumerate(nms)})
        export_s = time.perf_counter() - t
        set_threads(base, args.threads)
        merged_dir = work / "merged"
        t = time.perf_counter()
        to_onnx(neat_fx.fold(nms[0]), None, merged_dir, via="genai")
        merged_s = time.perf_counter() - t
        set_threads(merged_dir, args.threads)

        served = GenaiAdapters(base)  # og.Model + og.Adapters with every adapter loaded
        og_model, adapters = served.model, served.adapters
        timing = og.Adapters(og_model)  # the load time of one adapter file, measured on a second holder
        t = time.perf_counter()
        for name, path in report.adapters.items():
            timing.load(str(path), name)
        load_s = (time.perf_counter() - t) / args.adapters
        del timing
        merged = og.Model(str(merged_dir))

        rows = {f"a{i}": [] for i in range(args.adapters)}
        rows["merged a0"] = []
        same, outputs = {}, []
        for i in range(args.adapters):
            want = neat_fx.generate(nms[i], ids, max_new_tokens=args.new, eos_token_id=[], pad_token_id=0)
            want = want[0, args.prompt :].tolist()
            got = generate_genai(og_model, ids.numpy(), args.new, adapters, f"a{i}")[0]
            same[f"a{i}"] = sum(a == b for a, b in zip(got, want)) / len(want)
            outputs.append(tuple(got))
        generate_genai(merged, ids.numpy(), 4)  # warm-up
        for _ in range(args.rounds):  # interleaved: each adapter, then the merged model
            for i in range(args.adapters):
                rows[f"a{i}"].append(generate_genai(og_model, ids.numpy(), args.new, adapters, f"a{i}")[1:])
            rows["merged a0"].append((0.0,) + generate_genai(merged, ids.numpy(), args.new)[2:])
        ops = report.op_counts
        lifted = len(report.adapter_inputs)
        del served, og_model, adapters, merged
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = {}
    for k, rs in rows.items():
        table[k] = dict(
            switch_ms=1e3 * statistics.median(r[0] for r in rs),
            prefill_ms=1e3 * statistics.median(r[1] for r in rs),
            decode_ms_per_token=1e3 * statistics.median(r[2] for r in rs),
        )
    lines = [
        f"# {args.adapters} NEAT adapters in LoRA form on one onnxruntime-genai builder model — Qwen2.5-0.5B shape, "
        f"{args.layers} layers, random weights, all-linear rank {args.rank}, fp32 CPU, {args.threads} threads",
        "",
        f"Base: `to_onnx(model, None, dir, via='genai', adapters={{'a0': nm_0, …}})` — the builder with "
        f"`adapter_path`, its {lifted} LoRA initializers made graph inputs (zero defaults); one .onnx_adapter per "
        f"adapter (loaded in {1e3 * load_s:.0f} ms each); merged: `to_onnx(fold(nm_a0), None, dir, via='genai')`. "
        f"Prompt {args.prompt}, {args.new} new tokens, greedy, medians of {args.rounds} interleaved rounds.",
        "",
        "| row | set_active_adapter ms | prefill ms | decode ms/token | greedy tokens = neat_fx.generate |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in table.items():
        agree = f"{same[k]:.0%}" if k in same else "–"
        lines.append(
            f"| {k} | {v['switch_ms']:.2f} | {v['prefill_ms']:.0f} | {v['decode_ms_per_token']:.1f} | {agree} |"
        )
    lines += [
        "",
        f"Base graph ops: {', '.join(f'{k} ×{v}' for k, v in sorted(ops.items()) if v > 1)}. The export (a "
        f"builder run per adapter, verification of each) took {export_s:.0f} s; merged build {merged_s:.0f} s. The "
        f"adapters' greedy "
        f"continuations are {len(set(outputs))} distinct sequences of {args.adapters}. "
        f"`python benchmarks/genai_multi_lora.py --layers {args.layers} --adapters {args.adapters}"
        f"{' --small' if args.small else ''}`.",
    ]
    data = dict(
        vars(args),
        rows=table,
        token_agreement=same,
        distinct_outputs=len(set(outputs)),
        lifted_inputs=lifted,
        adapter_load_s=load_s,
        export_s=export_s,
        export_verification={k: v["tokens_equal"] for k, v in report.verification.items()},
        ops=ops,
    )
    save_results(STEM + ("_small" if args.small else ""), data, lines)


if __name__ == "__main__":
    main()
