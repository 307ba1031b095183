r"""NEAT on a quantized base (QLoRA-style) vs NEAT on the bf16 base vs PEFT LoRA on the same two bases (issue 22,
item 6): memory, train-step time, and quality on the tiny pre-trained causal LM.

Speed and memory. The base: Qwen/Qwen2.5-0.5B's shape (common.QWEN25_05B: hidden 896, intermediate 4864, 14 heads,
2 KV heads, vocab 151936, tied embeddings) with random weights (seed 0) and --layers decoder layers, saved once in
bf16 to a temporary folder and loaded from it by every configuration — as a QLoRA user loads a base:

- bf16:  `from_pretrained(folder, dtype=torch.bfloat16)`
- NF4:   `from_pretrained(folder, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
         bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))` (bitsandbytes' `Linear4bit`, no double
         quantization; the tied embedding / head stays bf16, as transformers leaves it)

and the adapters, rank 8 on every linear layer (not the head), float32 in both libraries (their defaults):

- NEAT: `neat_fx.transform(model, "all-linear", example_inputs=batch, rank=8)` (on the NF4 base each site
  dequantizes its W0 where the graph reads it, per step: docs/quantized.md)
- PEFT LoRA: `peft.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))` — on the NF4
  base that is QLoRA (PEFT's `lora.bnb.Linear4bit`). `prepare_model_for_kbit_training` is NOT called (it casts every
  float parameter, the 151936×896 embedding included, to float32 and turns on gradient checkpointing: more memory,
  and a different computation from the bf16 runs); no gradient checkpointing anywhere.

Train step: causal-LM loss on --batch × --seq random token ids (labels = ids), backward, AdamW on the adapters.
Time: one process holds the four models and runs --rounds interleaved rounds (the order rotates each round) of
--steps-per-round steps each after --warmup warm-up rounds; medians of all timed steps. Then one step of each under
torch.profiler (the top ops, the dequantize calls per step). Memory: each configuration in its own fresh process:
RSS after the imports, after loading the base, after building the adapters (every weight page touched: "model +
adapters" = that − after the imports), then the peak RSS reset (/proc/self/clear_refs) and --mem-steps training
steps: "peak training" = the peak RSS − after the imports. Also the exact bytes of the model's and the adapters'
tensors (quantization state included), and that figure for 24 layers computed from the parameter counts.

Quality: the tiny pre-trained causal LM of the tests (tests/lm_fixture.py, 2-layer LLaMA, hidden 64), per fixture
seed the `neat-fx finetune --task causal-lm` job of benchmarks/causal_lm_quality.py (500 steps × 32 rows, lr 1e-2,
all-linear NEAT) on the float32 base and with `--quantize-base nf4` (bitsandbytes NF4, float32 compute, as the CLI
loads it); exact match on the 200 eval sums, means and spread over the seeds. (`--no-onnx` on both: the ONNX export
after training does not change the figures.)

The committed CPU runs (results/quantized_base.md, results/quantized_base_12layers.md; ≈ 15 + 13 min on 2 cores):

    python benchmarks/quantized_base.py --layers 4 --batch 4 --seq 256 --rounds 4 --steps-per-round 2 --warmup 1 \
        --mem-steps 2
    python benchmarks/quantized_base.py --parts memory --layers 4 --batch 4 --seq 256 --mem-steps 2
    python benchmarks/quantized_base.py --parts speed --layers 12 --batch 2 --seq 128 --rounds 5 --steps-per-round 2 \
        --warmup 1 --mem-steps 2 --out quantized_base_12layers
    python benchmarks/quantized_base.py --parts memory --layers 12 --batch 2 --seq 128 --mem-steps 2 \
        --out quantized_base_12layers

The issue's full shape, on a GPU: python benchmarks/quantized_base.py --parts speed --layers 24 --device cuda

--parts speed / quality runs one part and keeps the other part's results from the existing results/quantized_base.json.
On CUDA, memory is torch.cuda.max_memory_allocated instead of RSS (same phases).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import QWEN25_05B, RESULTS, lm_fixture, peak_rss_mb, random_tokens, rss_mb, save_results

STEM = "quantized_base"
CONFIGS = ("neat-nf4", "neat-bf16", "lora-nf4", "lora-bf16")
LABELS = {
    "neat-nf4": "NEAT on NF4",
    "neat-bf16": "NEAT on bf16",
    "lora-nf4": "PEFT LoRA on NF4 (QLoRA)",
    "lora-bf16": "PEFT LoRA on bf16",
}
RANK = 8
BLOCK = 64  # bitsandbytes' 4-bit block size (transformers' default): one float32 absmax per 64 weights


# ---------------------------------------------------------------- the base and the adapters


def qwen_config(layers: int):
    import transformers

    return transformers.Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}, use_cache=False)


def make_folder(folder: Path, layers: int) -> None:
    """The random bf16 base (seed 0), saved once: every configuration loads these same weights."""
    import transformers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.Qwen2ForCausalLM(qwen_config(layers))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)


def load(folder: Path, base: str, device: str):
    import transformers

    kw = dict(dtype=torch.bfloat16, use_cache=False)
    if base == "nf4":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kw["device_map"] = {"": device}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)
    if base != "nf4":
        model = model.to(device)
    return model.requires_grad_(False)


def make_batch(batch: int, seq: int, device: str) -> dict:
    x = random_tokens(batch, seq, 0, ids=(0, QWEN25_05B["vocab_size"]), min_len=seq // 2, full_first=True)
    x.pop("token_type_ids")
    x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    return {k: v.to(device) for k, v in x.items()}


def build(config: str, model, batch: dict):
    """(module to train, its AdamW)."""
    method = config.split("-")[0]
    if method == "neat":
        import neat_fx

        module = neat_fx.transform(model, "all-linear", example_inputs=batch, rank=RANK, seed=0)
    else:
        import peft

        cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear")
        module = peft.get_peft_model(model, cfg)
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    return module, opt


def train_step(module, opt, batch: dict) -> float:
    loss = module(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _quant_state_tensors(p) -> list[torch.Tensor]:
    state = getattr(p, "quant_state", None)
    out = []
    while state is not None:
        out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    return out


def storage_bytes(*modules) -> dict:
    """Bytes of the distinct storages behind the modules' parameters and buffers (bitsandbytes' quantization state
    included): base (frozen) and adapters (trainable)."""
    seen: dict[int, tuple[int, bool]] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            for u in [t, *_quant_state_tensors(t)]:
                s = u.untyped_storage()
                key = s.data_ptr()
                seen[key] = (s.nbytes(), seen.get(key, (0, False))[1] or u.requires_grad)
    return {
        "base_bytes": sum(n for n, trained in seen.values() if not trained),
        "adapter_bytes": sum(n for n, trained in seen.values() if trained),
    }


def touch(*modules) -> None:
    """Read one byte of every 4 KiB page of every weight: pages a lazy load left unread become resident."""
    with torch.no_grad():
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if t.device.type == "cpu" and t.is_contiguous() and t.numel():
                    t.data.reshape(-1).view(torch.uint8)[::4096].sum()


def bound(layers: int, adapter_params_per_layer: int) -> dict:
    """Model + adapters bytes from the parameter counts (Qwen2.5-0.5B shape, `layers` layers): bf16 base vs NF4 base
    (linear weights at 4 bits + one float32 absmax per 64; embedding, norms and biases bf16), float32 adapters."""
    h, i, v = QWEN25_05B["hidden_size"], QWEN25_05B["intermediate_size"], QWEN25_05B["vocab_size"]
    kv = h // QWEN25_05B["num_attention_heads"] * QWEN25_05B["num_key_value_heads"]
    linear = 2 * h * h + 2 * h * kv + 3 * h * i  # q o, k v, gate up down
    small = h + 2 * kv + 2 * h  # q k v biases, two norms
    emb = v * h
    adapters = 4 * adapter_params_per_layer * layers
    bf16 = 2 * (emb + layers * (linear + small) + h) + adapters
    nf4 = 2 * (emb + layers * small + h) + layers * linear * (0.5 + 4 / BLOCK) + adapters
    layers_bf16 = 2 * layers * linear + adapters
    layers_nf4 = layers * linear * (0.5 + 4 / BLOCK) + adapters
    return {
        "layers": layers,
        "embedding_params": emb,
        "linear_params": layers * linear,
        "bf16_mb": bf16 / 2**20,
        "nf4_mb": nf4 / 2**20,
        "ratio": nf4 / bf16,
        "embedding_share_of_nf4": 2 * emb / nf4,
        "linear_layers_only_ratio": layers_nf4 / layers_bf16,
        "ratio_if_embedding_also_4bit": (nf4 - 2 * emb + emb * (0.5 + 4 / BLOCK)) / bf16,
    }


# ---------------------------------------------------------------- memory: one fresh process per configuration


def settle() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc malloc_trim), so that RSS is
    what the process holds, not what the quantize-on-load freed and malloc kept."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mapped_file_rss_mb(suffix: str) -> float:
    """RSS of this process's mappings of files ending in `suffix` (/proc/self/smaps), MB."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and head[-1].endswith(suffix)
        elif current and line.startswith("Rss:"):
            total += int(head[1])
    return total / 1024


def _status_mb(field: str) -> float:
    from common import proc_status_mb

    return proc_status_mb(field)


def mem_child(config: str, folder: Path, a) -> dict:
    import bitsandbytes  # noqa: F401  (every configuration imports everything: the same baseline)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import neat_fx  # noqa: F401

    cuda = a.device == "cuda"
    batch = make_batch(a.batch, a.seq, a.device)
    settle()
    now = (lambda: torch.cuda.memory_allocated() / 2**20) if cuda else rss_mb
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mb
    out = {"after_imports_mb": now()}
    model = load(folder, config.split("-")[1], a.device)
    touch(model)
    settle()
    out["after_load_mb"] = now()
    module, opt = build(config, model, batch)
    touch(model, module)
    settle()
    out["after_build_mb"] = now()
    out["peak_during_build_mb"] = peak()
    out.update(storage_bytes(model, module))
    out["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        out["rss_file_mb"], out["rss_anon_mb"] = _status_mb("RssFile"), _status_mb("RssAnon")
        out["rss_safetensors_mb"] = mapped_file_rss_mb(".safetensors")
    for _ in range(a.mem_steps):
        train_step(module, opt, batch)
    out["peak_training_mb"] = peak()
    out["model_adapters_mb"] = out["after_build_mb"] - out["after_imports_mb"]
    out["peak_training_over_imports_mb"] = out["peak_training_mb"] - out["after_imports_mb"]
    return out


# ---------------------------------------------------------------- time and profile


def profile_step(module, opt, batch, device: str, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(module, opt, batch)
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    return {
        "total_self_ms": total / 1e3,
        "top": [
            {"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
            for e in rows[:top]
        ],
        "dequantize_calls": sum(e.count for e in events if "dequantize" in e.key.lower()),
        "dequantize_ops": {e.key: e.count for e in events if "dequantize" in e.key.lower()},
        "dequantize_self_ms": sum(getattr(e, key) for e in events if "dequantize" in e.key.lower()) / 1e3,
        "matmul_calls": {e.key: e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")},
    }


def speed(folder: Path, a) -> dict:
    from tqdm.auto import tqdm

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    batch = make_batch(a.batch, a.seq, a.device)
    built, build_s = {}, {}
    for c in a.configs:
        t = time.perf_counter()
        built[c] = build(c, load(folder, c.split("-")[1], a.device), batch)
        build_s[c] = time.perf_counter() - t
    times = {c: [] for c in a.configs}
    losses = {c: [] for c in a.configs}
    names = list(a.configs)
    for r in tqdm(range(a.warmup + a.rounds), desc="interleaved rounds", unit="round"):
        for c in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(a.steps_per_round):
                sync()
                t = time.perf_counter()
                loss = train_step(*built[c], batch)
                sync()
                if r >= a.warmup:
                    times[c].append(1e3 * (time.perf_counter() - t))
                    losses[c].append(loss)
    profiles = {c: profile_step(*built[c], batch, a.device, a.profile_top) for c in names}
    return {
        c: {
            "build_s": build_s[c],
            "steps_ms": times[c],
            "median_step_ms": statistics.median(times[c]),
            "first_timed_loss": losses[c][0],
            "trainable_params": sum(p.numel() for p in built[c][0].parameters() if p.requires_grad),
            "profile": profiles[c],
        }
        for c in names
    }


# ---------------------------------------------------------------- quality


def cli() -> list[str]:
    script = Path(sys.executable).with_name("neat-fx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]


def quality(seeds: list[int]) -> dict:
    fx = lm_fixture()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            folder = Path(tmp) / f"seed{seed}"
            info = fx.build_folder(folder, seed=seed)
            for base, extra in (("fp32", []), ("nf4", ["--quantize-base", "nf4"])):
                args = fx.job_args(folder, folder / f"run-{base}") + ["--save-every", "0", "--no-onnx", *extra]
                t0 = time.perf_counter()
                r = subprocess.run(cli() + args, capture_output=True, text=True, timeout=1800)
                if r.returncode != 0:
                    raise SystemExit(f"seed {seed} {base}: the job failed\n{(r.stdout + r.stderr)[-4000:]}")
                rows = fx.table(r.stdout)
                em_before, em_after, n = fx.numbers(rows["exact match before → after"])
                loss_before, _, loss_after, _ = fx.numbers(rows["eval loss (perplexity) before → after"])
                runs.append(
                    {
                        "seed": seed,
                        "base": base,
                        "pretrain_steps": info["steps"],
                        "eval_rows": int(n),
                        "exact_match_before": em_before,
                        "exact_match_after": em_after,
                        "eval_loss_before": loss_before,
                        "eval_loss_after": loss_after,
                        "quantized_base": rows.get("quantized base"),
                        "job_seconds": round(time.perf_counter() - t0, 1),
                        "job_command": "neat-fx " + shlex.join(args).replace(str(folder), "$DIR"),
                    }
                )
                print(f"seed {seed} {base}: exact match {em_before:.1f} → {em_after:.1f} %", flush=True)
    summary = {}
    for base in ("fp32", "nf4"):
        ems = [r["exact_match_after"] for r in runs if r["base"] == base]
        summary[base] = {
            "mean": statistics.mean(ems),
            "stdev": statistics.stdev(ems) if len(ems) > 1 else 0.0,
            "min": min(ems),
            "max": max(ems),
        }
    gaps = [
        next(r for r in runs if r["seed"] == s and r["base"] == "nf4")["exact_match_after"]
        - next(r for r in runs if r["seed"] == s and r["base"] == "fp32")["exact_match_after"]
        for s in seeds
    ]
    summary["nf4_minus_fp32"] = {"per_seed": gaps, "mean": statistics.mean(gaps)}
    summary["target_met"] = summary["fp32"]["mean"] - summary["nf4"]["mean"] <= 3.0
    return {"runs": runs, "summary": summary}


# ---------------------------------------------------------------- report


def machine(a) -> dict:
    import bitsandbytes
    import peft
    import torchao
    import transformers

    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "torchao": torchao.__version__,
    }
    if a.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            out["cpu"] = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            pass
    return out


def mm(res: dict, c: str) -> int:
    return res[c]["profile"]["matmul_calls"].get("aten::mm", 0)


def paired_ratios(res: dict, ref: str) -> dict:
    """Per configuration, the quartiles of its timed steps over `ref`'s at the same position (same round)."""
    out = {}
    for c in res:
        r = [x / y for x, y in zip(res[c]["steps_ms"], res[ref]["steps_ms"])]
        out[c] = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return out


def speed_lines(s: dict) -> list[str]:
    a, res, mem, b = s["args"], s["results"], s["memory"], s["bound"]
    mem_unit = "CUDA max allocated" if a["device"] == "cuda" else "RSS"
    load = s["meta"]["load_average_before"], s["meta"]["load_average_after"]
    run = s["meta"].get("memory_run")
    lines = [
        "## Speed and memory",
        "",
        *(
            [
                f"Memory columns from `{run['command']}` ({run['date']}, load average before "
                f"{', '.join(f'{x:.2f}' for x in run['load_average_before'])}); the rest from:",
                "",
            ]
            if run
            else []
        ),
        f"Command: `{s['meta']['command']}` — {s['meta']['date']}, {s['meta'].get('cpu', s['meta'].get('gpu'))} "
        f"({s['meta']['machine']}, {s['meta']['cpus']} CPUs, {s['meta']['threads']} threads), torch "
        f"{s['meta']['torch']}, transformers {s['meta']['transformers']}, peft {s['meta']['peft']}, bitsandbytes "
        f"{s['meta']['bitsandbytes']}, torchao {s['meta']['torchao']}. Load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in load[0])}, after {', '.join(f'{x:.2f}' for x in load[1])} "
        "(the machine is shared: ratios from the same interleaved rounds, not absolute times, are the figures).",
        "",
        f"Shape: Qwen2.5-0.5B (hidden 896, intermediate 4864, 14 heads / 2 KV heads, vocab 151936, tied "
        f"embeddings) with **{a['layers']} layers**, random weights; batch **{a['batch']} × {a['seq']}** tokens "
        f"(random ids, rows padded after {a['seq'] // 2}–{a['seq']} tokens), {a['device']}; all-linear rank "
        f"{RANK} ({7 * a['layers']} sites), float32 adapters, AdamW; {a['rounds']} interleaved rounds × "
        f"{a['steps_per_round']} steps after {a['warmup']} warm-up round(s): median of "
        f"{a['rounds'] * a['steps_per_round']} steps per configuration.",
        "",
        f"| configuration | trainable | median step (ms) | × QLoRA | × same-base LoRA | × NEAT bf16 | "
        f"model + adapters, tensors (MB) | model + adapters, {mem_unit} (MB) | peak training, {mem_unit} (MB) | "
        "dequantize calls / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    med = {c: res[c]["median_step_ms"] for c in res}
    for c in res:
        same = "lora-" + c.split("-")[1]
        m = mem.get(c, {})
        tensors = (m.get("base_bytes", 0) + m.get("adapter_bytes", 0)) / 2**20 if m else float("nan")
        lines.append(
            f"| {LABELS[c]} | {res[c]['trainable_params']:,} | {med[c]:.0f} | "
            f"{med[c] / med['lora-nf4']:.2f} | {med[c] / med[same]:.2f} | {med[c] / med['neat-bf16']:.2f} | "
            f"{tensors:.0f} | {m.get('model_adapters_mb', float('nan')):.0f} | "
            f"{m.get('peak_training_over_imports_mb', float('nan')):.0f} | {res[c]['profile']['dequantize_calls']} |"
        )
    t = s["targets"]
    paired = paired_ratios(res, "lora-nf4")
    lines += [
        "",
        "Paired ratios (each timed step over the QLoRA step at the same position of the same round; median "
        "[quartiles]): "
        + ", ".join(f"{LABELS[c]} {q[1]:.2f} [{q[0]:.2f}, {q[2]:.2f}]" for c, q in paired.items() if c != "lora-nf4")
        + ". Step times per configuration, min–max: "
        + ", ".join(f"{LABELS[c]} {min(res[c]['steps_ms']):.0f}–{max(res[c]['steps_ms']):.0f} ms" for c in res)
        + ".",
    ]
    lines += [
        "",
        f"Memory columns: each configuration in its own fresh process; the {mem_unit} columns are over the process "
        "after its imports (model + adapters: after loading and building, every weight page touched, garbage "
        "collected and malloc_trim'med; peak "
        f"training: the peak over {a['mem_steps']} steps, peak reset after the build). Tensors: the exact bytes of "
        "the model's and adapters' tensors (bitsandbytes' absmax and code included). RSS over the tensors after the "
        "build: "
        + ", ".join(
            f"{LABELS[c]} {m['model_adapters_mb'] - (m['base_bytes'] + m['adapter_bytes']) / 2**20:+.0f} MB "
            f"(the process's file-backed / anonymous RSS {m['rss_file_mb']:.0f} / {m['rss_anon_mb']:.0f} MB"
            + (
                f", of which the mapped safetensors file {m['rss_safetensors_mb']:.0f} MB)"
                if "rss_safetensors_mb" in m
                else ")"
            )
            for c, m in mem.items()
            if "rss_file_mb" in m
        )
        + ". Peak during loading + building, over the imports: "
        + ", ".join(f"{LABELS[c]} {m['peak_during_build_mb'] - m['after_imports_mb']:.0f} MB" for c, m in mem.items())
        + " (NEAT's transform runs the model on the example batch to capture and check it).",
        "",
        "**Targets.**",
        f"- Model + adapters on NF4 ≤ 0.35× on bf16 (NEAT): tensors {t['memory_ratio_tensors']:.3f}, "
        f"{mem_unit} {t['memory_ratio_rss']:.3f} — **{'met' if t['memory_met'] else 'not met'}**. "
        f"Bound from the parameter counts at this shape ({a['layers']} layers): {b['run']['ratio']:.3f}; at 24 layers: "
        f"{b['24']['ratio']:.3f}. The tied 151936 × 896 embedding (136.1 M parameters) stays bf16 on both bases "
        f"(bitsandbytes quantizes Linear layers; the head is the embedding): {b['24']['embedding_share_of_nf4']:.0%} "
        f"of the 24-layer NF4 model's bytes. The linear layers alone (+ adapters) come to "
        f"{b['24']['linear_layers_only_ratio']:.3f}; with the embedding in 4 bits too the whole would be "
        f"{b['24']['ratio_if_embedding_also_4bit']:.3f}.",
        f"- NEAT step on NF4 ≤ 1.10× PEFT QLoRA's: {t['step_ratio']:.2f}× — "
        f"**{'met' if t['step_met'] else 'not met'}**. "
        f"(NEAT bf16 / LoRA bf16: {med['neat-bf16'] / med['lora-bf16']:.2f}×; NF4 / bf16: NEAT "
        f"{med['neat-nf4'] / med['neat-bf16']:.2f}×, LoRA {med['lora-nf4'] / med['lora-bf16']:.2f}×.)",
        f"- Why: both libraries dequantize each NF4 weight the same number of times per step "
        f"({res['neat-nf4']['profile']['dequantize_calls']} = one per site in the forward + one in the backward "
        "where the site's input needs a gradient): NEAT computes H = σ(W0ᵀA) from the W0 the forward dequantizes, "
        "so the quantized base costs NEAT what it costs QLoRA (the NF4 / bf16 ratios above). What remains is NEAT's "
        f"own cost over LoRA, the same on both bases: {mm(res, 'neat-nf4') - mm(res, 'lora-nf4')} more matmuls per "
        f"step ({mm(res, 'neat-nf4')} vs {mm(res, 'lora-nf4')}: two per site, H and its gradient, each a pass over "
        f"W0 at rank {RANK}).",
        "- RSS on CPU: loading through BitsAndBytesConfig reads the bf16 checkpoint to quantize it, and the "
        "mapped safetensors file stays resident (the column above), so the NF4 processes' RSS is not below the "
        "bf16 ones'; the tensors column is what the model holds.",
        "",
        "Profile of one step each (torch.profiler, self CPU time; top ops):",
        "",
    ]
    for c in res:
        p = res[c]["profile"]
        lines.append(
            f"- {LABELS[c]}: {p['total_self_ms']:.0f} ms profiled; dequantize {p['dequantize_calls']} calls "
            f"{p['dequantize_self_ms']:.0f} ms "
            f"({', '.join(f'{k} ×{v}' for k, v in p['dequantize_ops'].items()) or '—'}); "
            f"matmuls {', '.join(f'{k} ×{v}' for k, v in p['matmul_calls'].items())}; top: "
            + ", ".join(f"{r['op']} ×{r['calls']} {r['self_ms']:.0f} ms ({r['share']:.0%})" for r in p["top"][:8])
        )
    return lines


def quality_lines(q: dict) -> list[str]:
    s = q["summary"]
    lines = [
        "## Quality: the tiny pre-trained causal LM, float32 base vs NF4 base",
        "",
        f"Command: `{q['meta']['command']}` — {q['meta']['date']}, torch {q['meta']['torch']}, bitsandbytes "
        f"{q['meta']['bitsandbytes']}; load average before {', '.join(f'{x:.2f}' for x in q['meta']['load_average'])}. "
        f"The job per seed and base ($DIR = the seed's fixture folder): `{q['runs'][0]['job_command']}`, and "
        f"the same with `--quantize-base nf4`.",
        "",
        "Fixture (tests/lm_fixture.py): 2-layer LLaMA, hidden 64 (every projection's weight count a multiple of "
        "bitsandbytes' 64-weight block), pre-trained until 30 % probe exact match; 500 NEAT steps × 32 rows at lr "
        "1e-2 on all 14 linear sites; exact match on the 200 eval sums, the job's printed figures.",
        "",
        "| fixture seed | base | exact match before → after (%) | eval loss before → after |",
        "| --- | --- | --- | --- |",
    ]
    for r in q["runs"]:
        lines.append(
            f"| {r['seed']} | {r['base']} | {r['exact_match_before']:.1f} → {r['exact_match_after']:.1f} "
            f"| {r['eval_loss_before']:.4f} → {r['eval_loss_after']:.4f} |"
        )
    gap = s["fp32"]["mean"] - s["nf4"]["mean"]
    lines += [
        "",
        f"Exact match after training, mean ± stdev (min–max) over {len(s['nf4_minus_fp32']['per_seed'])} seeds: "
        f"float32 base {s['fp32']['mean']:.1f} ± {s['fp32']['stdev']:.1f} "
        f"({s['fp32']['min']:.1f}–{s['fp32']['max']:.1f}), "
        f"NF4 base {s['nf4']['mean']:.1f} ± {s['nf4']['stdev']:.1f} ({s['nf4']['min']:.1f}–{s['nf4']['max']:.1f}); "
        f"NF4 − float32 per seed: {', '.join(f'{g:+.1f}' for g in s['nf4_minus_fp32']['per_seed'])} points. "
        f"Target (NF4 within 3 points of float32, on the means): {gap:+.1f} points behind — "
        f"**{'met' if s['target_met'] else 'not met'}**.",
    ]
    return lines


def measure_memory(folder: Path, a) -> dict:
    memory = {}
    for c in a.configs:
        child = [sys.executable, __file__, "--mem-child", c, str(folder), "--batch", str(a.batch)]
        child += ["--seq", str(a.seq), "--mem-steps", str(a.mem_steps), "--threads", str(a.threads)]
        child += ["--device", a.device]
        out = subprocess.run(child, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"memory child {c} failed\n{out.stderr[-4000:]}")
        memory[c] = json.loads(out.stdout.strip().splitlines()[-1])
        print(c, memory[c], flush=True)
    return memory


def memory_targets(memory: dict) -> dict:
    if not {"neat-nf4", "neat-bf16"} <= memory.keys():
        return {}
    nf4, bf = memory["neat-nf4"], memory["neat-bf16"]
    t = {"memory_ratio_tensors": (nf4["base_bytes"] + nf4["adapter_bytes"]) / (bf["base_bytes"] + bf["adapter_bytes"])}
    t["memory_ratio_rss"] = nf4["model_adapters_mb"] / bf["model_adapters_mb"]
    t["memory_ratio_peak_training"] = nf4["peak_training_over_imports_mb"] / bf["peak_training_over_imports_mb"]
    t["memory_met"] = max(t["memory_ratio_tensors"], t["memory_ratio_rss"]) <= 0.35
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["speed", "quality"],
        choices=["speed", "memory", "quality", "report"],
        help="memory: the memory children again (the speed run's shape), the timing kept; report: write the "
        "markdown again from the existing JSON",
    )
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--profile-top", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=STEM, help="result file stem in benchmarks/results")
    ap.add_argument("--mem-child", nargs=2, metavar=("CONFIG", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.mem_child:
        print(json.dumps(mem_child(a.mem_child[0], Path(a.mem_child[1]), a)))
        return
    command = "python benchmarks/quantized_base.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    previous = RESULTS / f"{a.out}.json"
    data = json.loads(previous.read_text()) if previous.exists() else {}
    if "speed" in a.parts:
        meta = machine(a)
        meta["command"] = command
        meta["load_average_before"] = meta.pop("load_average")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "base"
            make_folder(folder, a.layers)
            memory = measure_memory(folder, a)  # before the timing: the children never run beside the timed process
            results = speed(folder, a)
        meta["load_average_after"] = os.getloadavg()
        per_layer = results["neat-nf4"]["trainable_params"] // a.layers if "neat-nf4" in results else 0
        b = {"run": bound(a.layers, per_layer), "24": bound(24, per_layer)}
        targets = memory_targets(memory)
        if {"neat-nf4", "lora-nf4"} <= results.keys():
            targets["step_ratio"] = results["neat-nf4"]["median_step_ms"] / results["lora-nf4"]["median_step_ms"]
            targets["step_met"] = targets["step_ratio"] <= 1.10
        data["speed"] = {
            "meta": meta,
            "args": {k: v for k, v in vars(a).items() if k not in ("mem_child", "parts", "out", "seeds")},
            "memory": memory,
            "results": results,
            "bound": b,
            "targets": targets,
        }
    if "memory" in a.parts and "speed" not in a.parts:
        old = data["speed"]["args"]
        if (old["layers"], old["batch"], old["seq"], old["device"]) != (a.layers, a.batch, a.seq, a.device):
            raise SystemExit(f"--parts memory: the shape must be the speed run's ({old})")
        before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "base"
            make_folder(folder, a.layers)
            data["speed"]["memory"] = measure_memory(folder, a)
        data["speed"]["args"]["mem_steps"] = a.mem_steps
        data["speed"]["targets"].update(memory_targets(data["speed"]["memory"]))
        data["speed"]["meta"]["memory_run"] = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_before": before,
            "load_average_after": os.getloadavg(),
        }
    if "quality" in a.parts:
        meta = machine(a)
        meta["command"] = command
        t0 = time.perf_counter()
        data["quality"] = quality(a.seeds)
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        data["quality"]["meta"] = meta
    lines = ["# NEAT on a quantized base (NF4) vs bf16, and vs PEFT LoRA / QLoRA (issue 22 item 6)", ""]
    if "speed" in data:
        lines += speed_lines(data["speed"]) + [""]
    if "quality" in data:
        lines += quality_lines(data["quality"])
    save_results(a.out, data, lines)


if __name__ == "__main__":
    main()
