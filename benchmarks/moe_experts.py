"""Routed experts: where to add ΔW. One training step (forward + backward) of a one-layer Qwen3-MoE (random
weights, hidden 256, 16 experts of intermediate 128, top-2, rank 8, fp32, 2 threads) with NEAT on both expert stacks,
in the two forms a graph pass can take:

- activation space (what neat_fx.transform inserts): the per-expert op run twice more on the factors of ΔW
  (`op(op(x, H), s·Bᵀ)`, routed like the weight), ΔW never formed;
- materialised: every reader of the stack reads `W + ΔW(W)`, the full (E, d_out, d_in) stack computed once per
  forward (the general rewrite that works for any consumer; what PEFT's LoRA on target_parameters does).

Baseline: the same model with NEAT on q_proj only (the backward still runs through the experts for the input
gradient). Measured: median step time (forms interleaved round by round: this machine's CPUs are shared), the
bytes autograd saves for the backward (unique storages, through saved-tensor hooks), and the peak resident memory
one step adds (in a fresh process per form: Linux VmHWM after resetting it), which also counts the transient
gradient buffers.

    python benchmarks/moe_experts.py   → results/moe_experts.{json,md}
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as T
from torch import nn

import neat_fx
from neat_fx.experts import EXPERT_HEAD, EXPERT_NODE, EXPERT_OUT

from common import save_results

HIDDEN, INTER, EXPERTS, TOP_K, RANK = 256, 128, 16, 2, 8
ROUNDS = 9
CASES = [("batched_mm", 64), ("batched_mm", 256), ("grouped_mm", 256), ("grouped_mm", 1024)]


def model(impl):
    torch.manual_seed(0)
    cfg = T.Qwen3MoeConfig(
        vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, moe_intermediate_size=INTER, intermediate_size=4 * HIDDEN, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, max_position_embeddings=2048, use_cache=False, experts_implementation=impl,
    )  # fmt: skip
    return T.Qwen3MoeForCausalLM(cfg).train()


class Materialise(nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, w):
        return w + self.adapter.delta_weight(w).to(w.dtype)


def materialised(nm):
    """Rewrite nm's graphs so every expert stack reader reads W + ΔW instead of the activation-space update."""
    nm.add_module("mat", nn.ModuleDict({k: Materialise(a) for k, a in nm.adapters.items() if a.experts}))
    for mode in nm.modes:
        gm = nm.graph_module(mode)
        gm._modules["mat"] = nm.mat
        graph = gm.graph
        for node in [n for n in graph.nodes if EXPERT_OUT in n.meta]:
            node.replace_all_uses_with(node.args[0])
        for node in reversed([n for n in graph.nodes if EXPERT_NODE in n.meta]):
            graph.erase_node(node)
        for head in [n for n in graph.nodes if EXPERT_HEAD in n.meta]:
            key, i = head.meta[EXPERT_HEAD]
            with graph.inserting_before(head):
                w = graph.call_module(f"mat.{key}", (head.args[i],))
            args = list(head.args)
            args[i] = w
            head.args = tuple(args)
        graph.lint()
        gm.recompile()
    return nm


def saved_bytes(step):
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(impl, tokens):
    m = model(impl)
    ids = torch.randint(3, 128, (tokens // 32, 32), generator=torch.Generator().manual_seed(1))
    example = {"input_ids": ids}
    both = ["*q_proj", "*experts.gate_up_proj", "*experts.down_proj"]
    makers = {
        "q_proj only (baseline)": lambda: neat_fx.transform(m, ["*q_proj"], example, rank=RANK, modes=("train",)),
        "activation space (neat_fx)": lambda: neat_fx.transform(m, both, example, rank=RANK, modes=("train",)),
        "materialised W + ΔW": lambda: materialised(neat_fx.transform(m, both, example, rank=RANK, modes=("train",))),
    }
    return m, ids, makers


def stepper(nm, ids):
    for ad in nm.adapters.values():
        with torch.no_grad():
            ad.B.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    params = [p for p in nm.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        nm(input_ids=ids).logits.float().square().mean().backward()

    return step


def peak(impl, tokens, form):
    """In a fresh process: the peak resident memory a training step adds (Linux VmHWM after a reset)."""
    torch.set_num_threads(2)
    _, ids, makers = build(impl, tokens)
    step = stepper(makers[form](), ids)
    step()
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    step()
    print(json.dumps({"peak_mb": (_status("VmHWM") - before) / 2**20}))


def main():
    torch.set_num_threads(2)
    rows, data = [], []
    for impl, tokens in CASES:
        m, ids, makers = build(impl, tokens)
        steps = {form: stepper(make(), ids) for form, make in makers.items()}
        times = {form: [] for form in steps}
        for step in steps.values():
            step()
            step()
        for _ in range(ROUNDS):  # interleaved: load from other processes hits every form alike
            for form, step in steps.items():
                t = time.perf_counter()
                step()
                times[form].append(time.perf_counter() - t)
        stack = sum(p.numel() * 4 for p in m.parameters() if p.dim() == 3)
        for form, step in steps.items():
            ms = statistics.median(times[form]) * 1e3
            saved = saved_bytes(step) / 2**20
            run = subprocess.run(
                [sys.executable, __file__, "--peak", impl, str(tokens), form], capture_output=True, text=True
            )
            if run.returncode:
                raise RuntimeError(run.stderr[-2000:])
            peak_mb = json.loads(run.stdout.strip().splitlines()[-1])["peak_mb"]
            data.append(dict(impl=impl, tokens=tokens, form=form, step_ms=ms, saved_mb=saved, peak_mb=peak_mb))
            rows.append(f"| {impl} | {tokens} | {form} | {ms:.1f} | {saved:.1f} | {peak_mb:.1f} |")
    lines = [
        f"One training step, 1-layer Qwen3-MoE: hidden {HIDDEN}, {EXPERTS} experts × intermediate {INTER}, "
        f"top-{TOP_K}, rank {RANK}, fp32, {torch.get_num_threads()} threads, median of {ROUNDS} interleaved "
        f"rounds. Both expert stacks: {stack / 2**20:.1f} MB. Saved = bytes autograd keeps for the backward; "
        f"peak = resident memory the step adds (fresh process, Linux VmHWM).",
        "",
        "| experts_implementation | tokens | NEAT on the experts | step (ms) | saved for backward (MB) | peak (MB) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    save_results("moe_experts", data, lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        peak(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
