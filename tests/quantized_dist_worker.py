"""Run by tests/test_quantized.py: NEAT on an NF4 (torchao) tiny LLaMA under DDP or FSDP2 with one unit per layer
(2 CPU processes over gloo), or
alone as the 1-process reference on the whole batch. Writes the trained adapters and what the test compares.

    python -m torch.distributed.run --nproc_per_node 2 tests/quantized_dist_worker.py ddp OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/quantized_dist_worker.py fsdp_blocks OUT
    python tests/quantized_dist_worker.py single OUT
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import test_quantized  # noqa: E402

import neat_fx  # noqa: E402
from neat_fx import quantized  # noqa: E402

import decoders  # noqa: E402

STEPS, GLOBAL_BATCH, LENGTH = 3, 4, 8


def batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        yield torch.randint(3, decoders.VOCAB, (GLOBAL_BATCH, LENGTH), generator=g)


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "single":
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    _, model, _ = test_quantized.build("torchao.nf4", seed=10)
    ids = next(batches())
    example = dict(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), labels=ids[:2])
    nm = neat_fx.transform(model, test_quantized.PATTERNS, example, rank=4, seed=0).train()
    with torch.no_grad():  # B ≠ 0: every adapter parameter gets a gradient from the first step
        g = torch.Generator().manual_seed(3)
        for ad in nm.adapters.values():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.1)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the frozen quantized base is not broadcast (DDP's broadcast rewrites NF4 weights): nm lists it for DDP
        assert nm._ddp_params_and_buffers_to_ignore
        run = DDP(nm)
    elif mode == "fsdp_blocks":
        from torch.distributed.fsdp import fully_shard

        for name in neat_fx.blocks(nm):  # one unit per layer (torchtitan's recipe), then the root
            fully_shard(neat_fx.submodule(nm, name))
        run = fully_shard(nm)
    else:
        run = nm
    params = [p for p in nm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    shard = GLOBAL_BATCH // world
    losses = []
    for ids in batches():
        part = ids[rank * shard : (rank + 1) * shard]
        loss = run(input_ids=part, attention_mask=torch.ones_like(part), labels=part).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    state = {}
    for k, v in nm.adapters.state_dict().items():
        full = getattr(v, "full_tensor", None)  # FSDP2: sharded DTensors, gathered (a collective: every rank)
        state[k] = (full() if full is not None else v).detach().contiguous()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "adapters.st"))
        weight = model.model.layers[0].self_attn.q_proj.weight
        local = getattr(weight, "_local_tensor", weight)  # FSDP2: this rank's shard of the NF4 weight
        result = dict(losses=losses, world=world, holder=type(weight).__name__, base=quantized.format_of(local))
        (out / "result.json").write_text(json.dumps(result))
    if mode != "single":
        del run, opt, params, nm
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if len(sys.argv) > 1 and sys.argv[1] != "single":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as tests/dist_worker.py: skip the interpreter's teardown of gloo's threads
