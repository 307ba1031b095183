"""Generation speed from a NEAT-transformed decoder vs Hugging Face generate on the merged model.

A Qwen2.5-0.5B-shaped model (its public config: 24 layers, width 896, MLP 4864, 14 query / 2 key-value heads,
vocabulary 151,936, tied head; random weights), NEAT on "all-linear" (rank 8, B randomised so ΔW ≠ 0). Batch 1,
a 128-token prompt, 64 new tokens, greedy, 2 threads. Rows, interleaved round by round (medians):

- HF eager fp32 / bf16: `model.generate` on `merge_into(copy.deepcopy(model), nm)` (and its bf16 copy);
- ours (nm): `neat_fx.generate(nm, …)` — folds W0 + ΔW at its first call and keeps them while the adapters do
  not change (the warm-up round pays it; `fold_s` measures it), then the model's own cached decode;
- ours (fold): `neat_fx.generate(neat_fx.fold(nm), …)` — folded once beforehand.

Prefill = call start → first new token; decode = median time between consecutive new tokens (a stopping
criterion stamps each step). Also: greedy tokens of every fp32 row compared, and the decode cost per token at a
32- vs a 512-token prefix (the KV cache keeps it flat but for attention's own share).

    python benchmarks/decoder_generate.py                 # the full measurement (≈ 10 min on 2 CPU cores)
    python benchmarks/decoder_generate.py --layers 2      # a quick look
    python benchmarks/decoder_generate.py --device cuda --dtype bf16   # on a GPU: + torch.compile row
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from common import QWEN25_05B, peak_rss_mb, randomise_adapters, save_results


class Stamps:
    """A stopping criterion that never stops: it records when each new token is there."""

    def __init__(self):
        self.times: list[float] = []
        self.sync = lambda: None

    def __call__(self, input_ids, scores, **kwargs):
        self.sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed(run, ids, new: int, sync) -> tuple[float, list[float], torch.Tensor]:
    """(prefill ms, per-token decode ms, tokens) of one generation."""
    from transformers import StoppingCriteriaList

    stamps = Stamps()
    stamps.sync = sync
    sync()
    start = time.perf_counter()
    out = run(ids, new, StoppingCriteriaList([stamps]))
    t = stamps.times
    return 1e3 * (t[0] - start), [1e3 * (b - a) for a, b in zip(t, t[1:])], out


def hf_runner(model):
    def run(ids, new, criteria):
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            use_cache=True,
            eos_token_id=[],
            pad_token_id=0,
            stopping_criteria=criteria,
        )

    return run


def ours_runner(module):
    import neat_fx

    def run(ids, new, criteria):
        return neat_fx.generate(
            module,
            ids,
            torch.ones_like(ids),
            max_new_tokens=new,
            eos_token_id=[],
            pad_token_id=0,
            stopping_criteria=criteria,
        )

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row (medians over them)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="on CUDA: the dtype of every row")
    ap.add_argument("--prefixes", default="32,512", help="prefix lengths of the decode-cost check")
    ap.add_argument("--out", default=None, help="results stem (default decoder_generate[_<device>])")
    args = ap.parse_args()

    import transformers as T

    import neat_fx

    warnings.filterwarnings("ignore")
    T.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.manual_seed(0)
    cfg = T.Qwen2Config(**dict(QWEN25_05B, num_hidden_layers=args.layers), use_cache=False)
    model = T.Qwen2ForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    example = dict(input_ids=torch.randint(0, cfg.vocab_size, (2, 16), generator=g).to(device))
    t = time.perf_counter()
    nm = neat_fx.transform(model, "all-linear", example, rank=args.rank, modes=("eval",), seed=0)
    transform_s = time.perf_counter() - t
    randomise_adapters(nm, std=0.05)
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    t = time.perf_counter()
    folded = neat_fx.fold(nm)
    fold_s = time.perf_counter() - t

    rows = {"HF eager": hf_runner(merged), "ours (nm)": ours_runner(nm), "ours (fold)": ours_runner(folded)}
    if not cuda:
        rows["HF eager bf16"] = hf_runner(copy.deepcopy(merged).to(torch.bfloat16))
    else:
        compiled = copy.deepcopy(merged)
        compiled.forward = torch.compile(compiled.forward)
        rows["HF torch.compile"] = hf_runner(compiled)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g).to(device)

    from tqdm.auto import tqdm

    prefill = {k: [] for k in rows}
    decode = {k: [] for k in rows}
    tokens = {}
    names = list(rows)
    for r in tqdm(range(args.rounds + 1), desc="interleaved rounds", unit="round"):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            p, d, out = timed(rows[k], ids, args.new, sync)
            tokens[k] = out.cpu()
            if r:  # round 0 warms up (allocations, compilation)
                prefill[k].append(p)
                decode[k].append(statistics.median(d))

    base = "HF eager"
    summary = {}
    for k in rows:
        ms = statistics.median(decode[k])
        summary[k] = dict(
            prefill_ms=statistics.median(prefill[k]),
            decode_ms_per_token=ms,
            decode_tokens_per_s=1e3 / ms,
            same_tokens_as_hf_eager=bool(torch.equal(tokens[k], tokens[base])),
        )
    for k in rows:
        summary[k]["decode_speed_vs_hf_eager"] = (
            summary[k]["decode_tokens_per_s"] / summary[base]["decode_tokens_per_s"]
        )

    # decode cost per token at a short and a long prefix: flat but for attention's own share
    prefix_rows = {}
    for k in ("ours (nm)", base):
        per = {}
        for n in (int(x) for x in args.prefixes.split(",")):
            p_ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g).to(device)
            timed(rows[k], p_ids, 4, sync)  # warm this shape
            per[n] = statistics.median(timed(rows[k], p_ids, 17, sync)[1])
        prefix_rows[k] = per

    short, long_ = (int(x) for x in args.prefixes.split(","))
    data = dict(
        model=f"Qwen2.5-0.5B shape, {args.layers} layers, random weights",
        device=str(device),
        dtype=args.dtype,
        threads=args.threads,
        prompt=args.prompt,
        new_tokens=args.new,
        rounds=args.rounds,
        rank=args.rank,
        patterns="all-linear",
        sites=len(nm.site_infos),
        transform_s=transform_s,
        fold_s=fold_s,
        rows=summary,
        decode_ms_per_token_by_prefix=prefix_rows,
        peak_rss_mb=peak_rss_mb() if not cuda else None,
        torch=torch.__version__,
        transformers=T.__version__,
    )
    lines = [
        f"# Decoder generation — {data['model']}, batch 1, prompt {args.prompt}, {args.new} new tokens, "
        f"{args.threads} threads, {device}",
        "",
        "| row | prefill ms | decode ms/token | decode tok/s | vs HF eager | same greedy tokens |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for k, v in summary.items():
        lines.append(
            f"| {k} | {v['prefill_ms']:.0f} | {v['decode_ms_per_token']:.1f} | {v['decode_tokens_per_s']:.1f} | "
            f"{v['decode_speed_vs_hf_eager']:.3f}× | {'yes' if v['same_tokens_as_hf_eager'] else 'no'} |"
        )
    lines += [
        "",
        f"Decode ms/token at prefix {short} → {long_}: "
        + "; ".join(
            f"{k}: {v[short]:.1f} → {v[long_]:.1f} ({v[long_] / v[short]:.2f}×)" for k, v in prefix_rows.items()
        ),
        "",
        f"NEAT all-linear rank {args.rank}: {len(nm.site_infos)} sites; transform {transform_s:.0f} s, fold "
        f"{fold_s:.1f} s. ours (nm) folded W0 + ΔW at its first call (warm-up) and kept them; ours (fold) was "
        "folded once beforehand.",
        f"Medians of {args.rounds} interleaved rounds after one warm-up round: "
        "`python benchmarks/decoder_generate.py`.",
    ]
    stem = args.out or ("decoder_generate" if not cuda else f"decoder_generate_{device.type}_{args.dtype}")
    save_results(stem, data, lines)


if __name__ == "__main__":
    main()
