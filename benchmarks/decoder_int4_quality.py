"""Quantized quality on a trained model (issue 23, item 6): the tiny addition LLaMA of the causal-LM tests
(tests/lm_fixture.py: 2 layers, hidden 64, pre-trained from scratch on two-digit sums to 30 % probe exact match),
exported at its own size by our with-past route and by onnxruntime-genai's model builder, fp32 and int4.

For each row: greedy completions (5 new tokens, stop at EOS) of the 200 eval sums of the fixture (eval.jsonl,
seed 2) — exact match against the true sums, and agreement with HF fp32's greedy completions (whole completion
equal; and per generated token, positions after either row's end counted as disagreeing when only one stopped;
EOS itself left out, as onnxruntime-genai leaves it out of its sequences).
Ours runs through `neat_fx.export.generate` in left-padded batches of 100; genai one prompt at a time
(onnxruntime-genai's Generator, greedy). int4: block 32 (the Qwen benchmark's) and 16 (hidden 64 has only two
blocks of 32 per row), symmetric, accuracy level 4 on both routes; ours also with `quantize_embedding=False` (the
embedding table left float, as the builder leaves this untied table), which isolates what quantizing the table costs.

    python benchmarks/decoder_int4_quality.py               # ≈ 3-6 min on the 2-core machine
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from common import lm_fixture, save_results

STEM = "decoder_int4_quality"
NEW = 5


def completions_hf(model, tok, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), 100):
            ids, mask = _left_padded(prompts[i : i + 100], tok.pad_token_id)
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            out += [_until_eos(row, tok.eos_token_id) for row in gen[:, ids.shape[1] :].tolist()]
    return out


def completions_ours(path: Path, tok, prompts: list[list[int]]) -> list[list[int]]:
    from neat_fx.export import generate, session

    sess = session(path, "cpu", threads=2)
    out = []
    for i in range(0, len(prompts), 100):
        ids, mask = _left_padded(prompts[i : i + 100], tok.pad_token_id)
        gen = generate(
            sess, ids, mask, max_new_tokens=NEW, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        out += [_until_eos(row, tok.eos_token_id) for row in gen[:, ids.shape[1] :].tolist()]
    return out


def completions_genai(folder: Path, tok, prompts: list[list[int]]) -> list[list[int]]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    out = []
    for p in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(p) + NEW, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray([p], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        out.append(_until_eos(gen.get_sequence(0).tolist()[len(p) :], tok.eos_token_id))
    return out


def _left_padded(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    """The completion before its EOS (onnxruntime-genai leaves the EOS out of the sequence, the others keep it)."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def score(rows, tok, got: list[list[int]], reference: list[list[int]]) -> dict:
    texts = tok.batch_decode(got, skip_special_tokens=True)
    exact = sum(t.strip() == r["completion"] for t, r in zip(texts, rows)) / len(rows)
    same = sum(g == r for g, r in zip(got, reference)) / len(rows)
    agree = total = 0
    for g, r in zip(got, reference):
        n = max(len(g), len(r))
        total += n
        agree += sum(a == b for a, b in zip(g, r))
    return {"exact_match": exact, "same_completion_as_hf_fp32": same, "token_agreement_with_hf_fp32": agree / total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the fixture's pre-training seed")
    ap.add_argument("--blocks", default="32,16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import transformers

    from neat_fx.export import to_onnx

    fx = lm_fixture()
    blocks = [int(b) for b in args.blocks.split(",")]
    with tempfile.TemporaryDirectory(prefix="int4q-") as tmp:
        root = Path(tmp)
        info = fx.build_folder(root, seed=args.seed)
        tok = transformers.AutoTokenizer.from_pretrained(root / "model")
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "model").eval()
        rows = [__import__("json").loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
        prompts = [tok(r["prompt"])["input_ids"] for r in rows]
        example = dict(zip(("input_ids", "attention_mask"), _left_padded(prompts[:2], tok.pad_token_id)))

        reference = completions_hf(model, tok, prompts)
        results = {"HF eager fp32": dict(score(rows, tok, reference, reference), export_s=None, size_bytes=None)}
        routes = [("ours fp32", "neat_fx", None, 32), ("genai fp32", "genai", None, 32)]
        for b in blocks:
            routes += [
                (f"ours int4 (block {b})", "neat_fx", "int4", b),
                (f"ours int4 (block {b}), quantize_embedding=False", "neat_fx_float_table", "int4", b),
                (f"genai int4 (block {b})", "genai", "int4", b),
            ]
        for label, via, quantize, block in routes:
            out = root / label.split(",")[0].replace(" ", "_").replace("(", "").replace(")", "")
            out = out.with_name(out.name + ("_float_table" if via == "neat_fx_float_table" else ""))
            t = time.perf_counter()
            if via.startswith("neat_fx"):
                report = to_onnx(
                    model,
                    example,
                    out.with_suffix(".onnx"),
                    task="text-generation-with-past",
                    quantize=quantize,
                    block_size=block,
                    quantize_embedding=via != "neat_fx_float_table",
                )
                seconds = time.perf_counter() - t
                got = completions_ours(out.with_suffix(".onnx"), tok, prompts)
                size = report.size_bytes
                ops = {
                    k: v
                    for k, v in report.op_counts.items()
                    if k in ("MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "Gather")
                }
            else:
                report = to_onnx(model, example, out, via="genai", quantize=quantize, block_size=block)
                seconds = time.perf_counter() - t
                got = completions_genai(out, tok, prompts)
                size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                ops = {
                    k: v
                    for k, v in report.op_counts.items()
                    if k in ("MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "Gather")
                }
            results[label] = dict(score(rows, tok, got, reference), export_s=seconds, size_bytes=size, ops=ops)
            print(label, results[label], flush=True)

    lines = [
        f"# Quantized quality on the trained tiny LLaMA (tests/lm_fixture.py, seed {args.seed}: 2 layers, hidden 64, "
        f"pre-trained to {info['exact_match']:.0%} probe exact match in {info['steps']} steps)",
        "",
        f"200 eval sums, greedy, {NEW} new tokens, stop at EOS. Exact match: the completion equals the true sum; "
        "agreement: with HF eager fp32's greedy completions.",
        "",
        "| row | exact match | same completion as HF fp32 | token agreement with HF fp32 | MatMulNBits | "
        "embedding | size |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for label, r in results.items():
        size = f"{r['size_bytes'] / 1024:.0f} KB" if r.get("size_bytes") else "–"
        lines.append(
            f"| {label} | {r['exact_match']:.1%} | {r['same_completion_as_hf_fp32']:.1%} | "
            f"{r['token_agreement_with_hf_fp32']:.1%} | {r.get('ops', {}).get('MatMulNBits', '–')} | "
            f"{'int4 (GatherBlockQuantized)' if r.get('ops', {}).get('GatherBlockQuantized') else 'float'} | {size} |"
        )
    lines += ["", f"`python benchmarks/decoder_int4_quality.py --seed {args.seed}`; {platform.processor() or 'cpu'}."]
    data = dict(fixture=info, rows=results, new_tokens=NEW, seed=args.seed, torch=torch.__version__)
    save_results(STEM, data, lines)


if __name__ == "__main__":
    main()
