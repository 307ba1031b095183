"""Many NEAT adapters on one onnxruntime-genai builder model (issue 23, item 7): what genai 0.18 can do, measured.

What the builder and the runtime take (onnxruntime-genai 0.18, read from its source and checked here):
- the builder's `adapter_path` extra option takes ONE PEFT LoRA folder and writes its A/B matrices into the graph
  as constant MatMul pairs beside each base MatMul (`…/lora_A/MatMul`, `…/lora_B/MatMul` scaled by alpha/r, an
  Add); with LoRA it turns off the packed q/k/v MatMul ("Packed MatMul with LoRA/QLoRA is not currently
  supported"); it writes no adapter files and leaves the LoRA weights as initializers, not graph inputs;
- the runtime's `og.Adapters(model).load(file, name)` + `Generator.set_active_adapter(adapters, name)` feed the
  tensors of an ONNX Runtime adapter file (`.onnx_adapter`, `onnxruntime.AdapterFormat`) as the graph inputs of
  the same names.

So this script: saves N NEAT adapters in their exact LoRA form (`neat_fx.save_adapters(nm, dir, format="lora")`:
lora_A = Hᵀ, lora_B = B), runs the builder once per adapter (fp32, CPU) to get each adapter's LoRA tensors as the
builder lays them out, keeps the first build as the base and turns its LoRA initializers into graph inputs (the
initializers stay as their defaults), writes one `.onnx_adapter` per adapter, then in onnxruntime-genai: greedy
tokens of each adapter vs `neat_fx.generate(nm_i)` (the same prompt), the time to switch adapters, and decode
speed with an adapter active vs the single merged model built by the builder (`to_onnx(..., via="genai")`).

    python benchmarks/genai_multi_lora.py                  # Qwen2.5-0.5B shape, 4 layers, 3 adapters (≈ 3 min)
    python benchmarks/genai_multi_lora.py --layers 24      # the full depth
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


def run_builder(hf_dir: Path, out: Path, cache: Path, adapter: Path | None):
    import contextlib
    import io

    from onnxruntime_genai.models import builder

    items = [f"adapter_path={adapter}"] if adapter else []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        extra = builder.parse_extra_options(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), items)
        builder.create_model(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), **extra)


def lora_tensors(model_path: Path) -> dict:
    """The builder's LoRA initializers of a built model: name → NumPy array."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if ".lora_" in t.name}


def lift_to_inputs(model_path: Path, names: set[str]) -> int:
    """Make the initializers `names` graph inputs too (their values stay as defaults): ONNX Runtime then takes
    them from a feed, which is what an adapter file gives."""
    import onnx

    m = onnx.load(str(model_path))
    have = {i.name for i in m.graph.input}
    added = 0
    for t in m.graph.initializer:
        if t.name in names and t.name not in have:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            added += 1
    data = model_path.with_name(model_path.name + ".data")
    onnx.save_model(m, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return added


def write_adapter(path: Path, tensors: dict):
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


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
    from neat_fx.export import genai_route, to_onnx

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
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir)
        genai_route._placeholder_tokenizer(model.config).save_pretrained(hf_dir)
        per_adapter, build_s = [], []
        for i, nm in enumerate(nms):
            lora = work / f"lora{i}"
            neat_fx.save_adapters(nm, lora, format="lora")
            t = time.perf_counter()
            run_builder(hf_dir, work / f"built{i}", work / "cache", lora)
            build_s.append(time.perf_counter() - t)
            per_adapter.append(lora_tensors(work / f"built{i}" / "model.onnx"))
            if i:
                shutil.rmtree(work / f"built{i}")
        base = work / "built0"
        names = set(per_adapter[0])
        lifted = lift_to_inputs(base / "model.onnx", names)
        set_threads(base, args.threads)
        for i, tensors in enumerate(per_adapter):
            write_adapter(work / f"adapter{i}.onnx_adapter", tensors)
        merged_dir = work / "merged"
        t = time.perf_counter()
        to_onnx(neat_fx.fold(nms[0]), None, merged_dir, via="genai")
        merged_s = time.perf_counter() - t
        set_threads(merged_dir, args.threads)

        og_model = og.Model(str(base))
        adapters = og.Adapters(og_model)
        t = time.perf_counter()
        for i in range(args.adapters):
            adapters.load(str(work / f"adapter{i}.onnx_adapter"), f"a{i}")
        load_s = (time.perf_counter() - t) / args.adapters
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
        ops = genai_route._graph_facts(base / "model.onnx")[0]
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
        f"Base: the builder with `adapter_path` (adapter a0), its {lifted} LoRA initializers made graph inputs; one "
        f".onnx_adapter per adapter (the builder's own layout of each adapter, loaded in {1e3 * load_s:.0f} ms each); "
        f"merged: `to_onnx(fold(nm_a0), None, dir, via='genai')`. Prompt {args.prompt}, {args.new} new tokens, greedy, "
        f"medians of {args.rounds} interleaved rounds.",
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
        f"Base graph ops: {', '.join(f'{k} ×{v}' for k, v in sorted(ops.items()) if v > 1)}. Builder runs per adapter: "
        f"{', '.join(f'{s:.0f} s' for s in build_s)}; merged build {merged_s:.0f} s. The adapters' greedy "
        f"continuations are {len(set(outputs))} distinct sequences of {args.adapters}. "
        f"`python benchmarks/genai_multi_lora.py --layers {args.layers} --adapters {args.adapters}`.",
    ]
    data = dict(
        vars(args),
        rows=table,
        token_agreement=same,
        distinct_outputs=len(set(outputs)),
        lifted_inputs=lifted,
        adapter_load_s=load_s,
        ops=ops,
    )
    save_results(STEM + ("_small" if args.small else ""), data, lines)


if __name__ == "__main__":
    main()
