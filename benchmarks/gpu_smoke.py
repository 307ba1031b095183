"""GPU smoke check and training-step timing on one CUDA card (run on a lent GPU machine).

A MiniLM-shaped BERT (6 layers, hidden 384, random weights), batch 32 × 64 tokens, query/value targets, r=8:
train-step time of neat_fx NEAT vs PEFT LoRA vs PEFT PEANuT (when peft is installed), interleaved, median of
`--steps` steps after warm-up, fp32 and bf16; plus fold parity on the card. Prints JSON."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from common import random_minilm, trainable_parameters


def build():
    torch.manual_seed(0)
    return random_minilm()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    import neat_fx

    dev = "cuda"
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ids = torch.randint(0, 30522, (32, 64), device=dev)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    labels = torch.randint(0, 2, (32,), device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        base = build().to(dev, dtype)
        runners = {}
        nm = neat_fx.transform(copy.deepcopy(base), ["*query", "*value"], batch, rank=8, trainable=["classifier*"])
        runners["neat_fx NEAT"] = nm
        try:
            import peft

            runners["PEFT LoRA"] = peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
            )
            if hasattr(peft, "PeanutConfig"):
                runners["PEFT PEANuT"] = peft.get_peft_model(
                    copy.deepcopy(base),
                    peft.PeanutConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
                )
        except ImportError:
            pass
        opts = {k: torch.optim.AdamW(trainable_parameters(m), lr=1e-4) for k, m in runners.items()}
        times = {k: [] for k in runners}
        for step in range(a.steps + 5):
            for k, m in runners.items():
                m.train()
                torch.cuda.synchronize()
                t = time.perf_counter()
                loss = torch.nn.functional.cross_entropy(m(**batch).logits.float(), labels)
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
                torch.cuda.synchronize()
                if step >= 5:
                    times[k].append((time.perf_counter() - t) * 1e3)
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        peak = {}
        for k, m in runners.items():
            torch.cuda.reset_peak_memory_stats()
            loss = torch.nn.functional.cross_entropy(m(**batch).logits.float(), labels)
            loss.backward()
            torch.cuda.synchronize()
            peak[k] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        nm.eval()
        with torch.no_grad():
            folded = neat_fx.fold(nm)
            d = (folded(**batch).logits.float() - nm(**batch).logits.float()).abs().max().item()
        entry = {"median_step_ms": med, "peak_alloc_mb_fwd_bwd": peak, "fold_max_abs_diff_logits": d}
        if "PEFT LoRA" in med:
            entry["neat_over_lora"] = round(med["neat_fx NEAT"] / med["PEFT LoRA"], 3)
        if "PEFT PEANuT" in med:
            entry["neat_over_peanut"] = round(med["neat_fx NEAT"] / med["PEFT PEANuT"], 3)
        res[str(dtype).removeprefix("torch.")] = entry
        print(json.dumps({str(dtype): entry}), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
