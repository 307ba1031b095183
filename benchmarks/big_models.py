"""Models bigger than one device (issue 16), measured on this machine's CPU:

1. FSDP2, 2 ranks over gloo, an 8-layer LLaMA shape: per-rank peak bytes of parameters (local shards + gathered
   copies) sampled at every layer's forward and at every saved-tensor unpack of the backward, with one root unit
   vs one unit per layer (neat_fx.submodule) + the root.
2. Activation checkpointing on a 12-layer LLaMA shape: bytes the forward keeps for the backward (live tensor
   storage after the forward, less the logits) and the training step's time, interleaved, median.
3. Meta-device capture on the LLaMA-3.2-1B shape (random weights): RSS that `transform` adds, for a model
   built on the meta device vs a real one; one fresh process each.

    python benchmarks/big_models.py            # all three, ≈ 10 min on 2 cores
    python benchmarks/big_models.py --only checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def llama(layers: int, hidden: int, vocab: int = 1024, dropout: float = 0.0):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
        attention_dropout=dropout,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg)


# -- 1. FSDP2: per-rank parameter bytes, root unit vs per-layer units -----------------------------------------
def fsdp_param_bytes(nm) -> int:
    """Bytes of parameter storage one rank holds now: local shards plus gathered (unsharded) copies. Reads FSDP2's
    parameter records (torch internals: a benchmark-only probe)."""
    from torch.distributed.fsdp import FSDPModule

    storages = {}
    for m in nm.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        for fp in group.fsdp_params if group is not None else ():
            tensors = [fp._sharded_param_data, *getattr(fp, "all_gather_outputs", [])]
            if hasattr(fp, "_unsharded_param"):
                tensors.append(fp._unsharded_param)
            for t in tensors:
                st = t.untyped_storage()
                storages[st._cdata] = st.nbytes()
    return sum(storages.values())


def fsdp_worker(variant: str, out: str):
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import neat_fx

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = llama(layers=8, hidden=256)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    ex = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    whole = sum(p.numel() * p.element_size() for p in nm.parameters())
    if variant == "per_layer":
        for name in neat_fx.blocks(nm):
            fully_shard(neat_fx.submodule(nm, name))
    fully_shard(nm)
    samples = []
    probe = lambda *a: samples.append(fsdp_param_bytes(nm))  # noqa: E731
    for name in neat_fx.blocks(nm):  # forward: after each layer's unshard (FSDP's hook runs first) and after it
        layer = neat_fx.submodule(nm, name)
        layer.register_forward_pre_hook(lambda m, a: probe())
        layer.register_forward_hook(lambda m, a, o: probe())
    nm.train()
    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: (probe(), t)[1]):
            loss = nm(**ex).logits.float().pow(2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
    if dist.get_rank() == 0:
        Path(out).write_text(
            json.dumps(dict(variant=variant, whole_bytes=whole, peak_bytes=max(samples), samples=len(samples)))
        )
    dist.barrier()
    dist.destroy_process_group()


def run_fsdp() -> dict:
    rows = {}
    for variant in ("root", "per_layer"):
        out = Path(f"/tmp/neat_fx_big_models_{variant}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [__file__, "--fsdp-worker", variant, str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
        rows[variant] = json.loads(out.read_text())
    return rows


# -- 2. activation checkpointing -----------------------------------------------------------------------------------
def run_checkpoint(steps: int, hidden: int) -> dict:
    import torch

    import neat_fx
    from neat_fx.memory import LiveTensorBytes

    from common import interleave, median_of

    torch.set_num_threads(2)
    model = llama(layers=12, hidden=hidden, dropout=0.0)
    ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
    ex = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    nm.train()
    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = nm(**ex).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    def saved_bytes() -> int:
        with LiveTensorBytes() as live:
            out = nm(**ex).logits
            saved = live.now - live.bytes_of(out)
            out.float().pow(2).mean().backward()
        opt.zero_grad()
        return saved

    blocks = neat_fx.blocks(nm)
    # every layer (torch's full activation checkpointing), and three of every four (layer-selective: the layer
    # left out keeps its activations, a quarter less recomputation)
    variants = {"plain": False, "all layers": True, "3 of 4 layers": [b for i, b in enumerate(blocks) if i % 4 != 3]}

    def with_checkpointing(which):
        def run(_step):
            nm.set_checkpointing(which)
            step()

        return run

    bytes_of = {}
    for name, which in variants.items():
        nm.set_checkpointing(which)
        bytes_of[name] = saved_bytes()

    def forward_only(_step):  # the forward of a training step alone: full checkpointing's floor is 1 + its share
        nm.set_checkpointing(False)
        nm(**ex).logits.float().pow(2).mean()

    fns = {name: with_checkpointing(which) for name, which in variants.items()}
    times = interleave({**fns, "forward": forward_only}, n=steps, warmup=2, desc="checkpointing")
    med = median_of(times)
    return dict(
        saved_bytes=bytes_of,
        saved_ratio={k: bytes_of["plain"] / v for k, v in bytes_of.items()},
        step_ms=med,
        step_ratio={k: med[k] / med["plain"] for k in variants},
        forward_share=med["forward"] / med["plain"],
        steps=steps,
        shape=f"LLaMA 12 layers, hidden {hidden}, batch 4 × 256 tokens, all-linear rank 8",
    )


# -- 3. meta-device capture of the LLaMA-3.2-1B shape ----------------------------------------------------------------
def meta_worker(on_meta: bool, out: str):
    import torch
    import transformers

    import neat_fx

    from common import LLAMA32_1B, rss_mb

    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(**LLAMA32_1B, use_cache=False)
    before_model = rss_mb()
    if on_meta:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    ex = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    params = sum(p.numel() for p in model.parameters())
    before = rss_mb()
    t = time.perf_counter()
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    seconds = time.perf_counter() - t
    after = rss_mb()
    Path(out).write_text(
        json.dumps(
            dict(
                on_meta=on_meta,
                parameters=params,
                model_rss_mb=before - before_model,
                transform_added_rss_mb=after - before,
                transform_s=seconds,
                sites=len(nm.sites()),
                adapter_params=sum(p.numel() for p in nm.adapters.parameters()),
            )
        )
    )


def run_meta() -> dict:
    rows = {}
    for on_meta in (True, False):
        out = Path(f"/tmp/neat_fx_big_models_meta_{on_meta}.json")
        cmd = [sys.executable, __file__, "--meta-worker", "meta" if on_meta else "real", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=HERE)
        if r.returncode != 0:
            raise SystemExit(r.stdout[-3000:] + r.stderr[-3000:])
        rows["meta" if on_meta else "real"] = json.loads(out.read_text())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("fsdp", "checkpoint", "meta"), action="append")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (checkpointing)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the checkpointing model")
    ap.add_argument("--fsdp-worker", nargs=2, metavar=("VARIANT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--meta-worker", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if a.fsdp_worker:
        return fsdp_worker(*a.fsdp_worker)
    if a.meta_worker:
        return meta_worker(a.meta_worker[0] == "meta", a.meta_worker[1])
    parts = a.only or ["fsdp", "checkpoint", "meta"]
    path = HERE / "results" / "big_models.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU"
    if "fsdp" in parts:
        data["fsdp"] = run_fsdp()
    if "checkpoint" in parts:
        data["checkpoint"] = run_checkpoint(a.steps, a.hidden)
    if "meta" in parts:
        data["meta"] = run_meta()
    from common import save_results

    save_results("big_models", data, table(data))


def table(d: dict) -> list[str]:
    lines = [
        "# Big models (issue 16)",
        "",
        f"Machine: {d.get('machine')}. Command: `python benchmarks/big_models.py`.",
        "",
    ]
    if "fsdp" in d:
        r, p = d["fsdp"]["root"], d["fsdp"]["per_layer"]
        mb = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        lines += [
            "## FSDP2, 2 ranks (gloo), LLaMA 8 layers × hidden 256: per-rank peak parameter bytes",
            "",
            "| units | peak per rank | whole model |",
            "|---|---|---|",
            f"| one root unit | {mb(r['peak_bytes'])} | {mb(r['whole_bytes'])} |",
            f"| one per layer + root | {mb(p['peak_bytes'])} | {mb(p['whole_bytes'])} |",
            "",
            f"Per-layer units hold {r['peak_bytes'] / p['peak_bytes']:.2f}× fewer parameter bytes at peak.",
            "",
        ]
    if "checkpoint" in d:
        c = d["checkpoint"]
        lines += [
            f"## Activation checkpointing: {c['shape']}",
            "",
            "| checkpointing | saved for backward | smaller by | step (median) | step ratio |",
            "|---|---|---|---|---|",
        ]
        for k in c["saved_bytes"]:
            lines.append(
                f"| {k} | {c['saved_bytes'][k] / 2**20:.1f} MiB | {c['saved_ratio'][k]:.2f}× | "
                f"{c['step_ms'][k]:.0f} ms | {c['step_ratio'][k]:.3f}× |"
            )
        lines += [
            "",
            f"{c['steps']} interleaved steps each. The forward alone is {c['forward_share']:.2f} of a plain step: "
            f"recomputing every layer costs at least {1 + c['forward_share']:.2f}× on this machine.",
            "",
        ]
    if "meta" in d:
        lines += [
            "## transform on the LLaMA-3.2-1B shape (random weights, fp32)",
            "",
            "| built on | parameters | model RSS | RSS transform adds | transform time |",
            "|---|---|---|---|---|",
        ]
        for k in ("meta", "real"):
            m = d["meta"][k]
            lines.append(
                f"| {k} | {m['parameters'] / 1e9:.2f} B | {m['model_rss_mb']:.0f} MB | "
                f"{m['transform_added_rss_mb']:.0f} MB | {m['transform_s']:.1f} s |"
            )
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
