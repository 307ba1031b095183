"""Run by tests/test_distributed.py under `torch.distributed.run` (CPU, gloo), or alone as the 1-process
reference. Trains a tiny BERT with NEAT for a few steps and writes what the test compares.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py ddp OUT
    python tests/dist_worker.py single OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py fsdp OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py fsdp_blocks OUT
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import neat_fx  # noqa: E402

import zoo  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8


def batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        ids = torch.randint(0, 120, (GLOBAL_BATCH, 12), generator=g)
        yield (
            dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
            torch.randint(0, 3, (GLOBAL_BATCH,), generator=g),
        )


def build():
    model, ex, _, patterns = zoo.bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # ranks and the 1-process run must see the same function
    nm = neat_fx.transform(model, patterns, ex, rank=4, seed=0, trainable=["classifier*"])
    with torch.no_grad():  # B ≠ 0, so every adapter parameter gets a gradient from the first step
        g = torch.Generator().manual_seed(3)
        for ad in nm.adapters.values():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.1)
    return nm


def adapter_state(nm) -> dict:
    """The trained tensors as plain tensors (under FSDP2 state_dict() gives sharded DTensors: gather them)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in nm.state_dict().items():
        if k.startswith("adapters.") or k.startswith("trainable."):
            v = v.full_tensor() if isinstance(v, DTensor) else v
            out[k] = v.detach().clone().contiguous()
    return out


def watch_unsharding(nm) -> list:
    """Record, each time a layer's unit starts its forward, whether that layer's weights are whole (gathered) and
    every other layer's are still sharded: the evidence that one layer at a time is unsharded."""
    from torch.distributed.tensor import DTensor

    seen = []
    names = neat_fx.blocks(nm)
    layers = {n: neat_fx.submodule(nm, n) for n in names}

    def hook(module, args):  # registered after fully_shard: runs after FSDP's unshard
        mine = all(not isinstance(p, DTensor) for p in module.parameters())
        others = all(isinstance(p, DTensor) for m in layers.values() if m is not module for p in m.parameters())
        seen.append(bool(mine and others))

    for m in layers.values():
        m.register_forward_pre_hook(hook)
    return seen


def foreign_unit_error() -> str:
    """fully_shard on a module that is not a block of nm (an attention sublayer): the message nm raises."""
    from torch.distributed.fsdp import fully_shard

    nm = build()
    fully_shard(nm.model.bert.encoder.layer[0].attention)
    fully_shard(nm)
    probe = next(batches())[0]
    try:
        nm(**{k: v[:2] for k, v in probe.items()})
    except neat_fx.ConfigError as exc:
        return str(exc)
    return ""


def meta_sharded_init() -> float:
    """A BERT built on the meta device, transformed, one FSDP2 unit per layer and the root, then materialised
    with to_empty and loaded shard by shard (each rank keeps its part): it computes what a transform of the real
    model computes (largest logit difference, eval mode)."""
    from torch.distributed.fsdp import fully_shard

    from neat_fx.distributed import copy_into

    real, ex, _, patterns = zoo.bert()
    with torch.device("meta"):
        model = type(real)(real.config)
    nm = neat_fx.transform(model, patterns, ex, rank=4, seed=0)
    for name in neat_fx.blocks(nm):
        fully_shard(neat_fx.submodule(nm, name))
    fully_shard(nm)
    nm.to_empty(device="cpu")
    ref = neat_fx.transform(real, patterns, ex, rank=4, seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            copy_into(p, real.get_parameter(name))
        for name, b in real.named_buffers():
            model.get_buffer(name).copy_(b)
        for key, ad in ref.adapters.items():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g) * 0.1)
            copy_into(nm.adapters[key].B, ad.B)
    nm.eval(), ref.eval()
    with torch.no_grad():
        return float((nm(**ex).logits - ref(**ex).logits).abs().max())


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack into the test's log
    torch.manual_seed(0)
    if mode == "single":
        rank, world = 0, 1
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    nm = build()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        run = DDP(nm)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        run = fully_shard(nm)  # one unit at the root: every weight gathered around nm's forward
    elif mode == "fsdp_blocks":
        from torch.distributed.fsdp import fully_shard

        # torchtitan's recipe: one unit per transformer layer (nm runs each layer's graph through the layer's
        # own hooks), activation checkpointing per layer, then the root unit for the rest.
        for name in neat_fx.blocks(nm):
            fully_shard(neat_fx.submodule(nm, name))
        nm.set_checkpointing(True)
        run = fully_shard(nm)
        unsharded_alone = watch_unsharding(nm)
    else:
        run = nm
    params = [p for p in nm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)  # momentum: the optimizer state a resume must restore
    losses, agree = [], []
    shard = GLOBAL_BATCH // world
    extra = {}

    def step(inputs, labels):
        part = {k: v[rank * shard : (rank + 1) * shard] for k, v in inputs.items()}
        loss = torch.nn.functional.cross_entropy(run(**part).logits, labels[rank * shard : (rank + 1) * shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    for i, (inputs, labels) in enumerate(batches()):
        if mode == "fsdp_blocks" and i == STEPS - 1:
            # a checkpoint of the sharded run before the last step; below, resuming from it redoes that step
            neat_fx.save_checkpoint(out / "ckpt", nm, opt, step=i)
        losses.append(step(inputs, labels))
        if mode == "ddp":
            # every rank holds the same adapters after every step
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            agree.append(max(float((g - gathered[0]).abs().max()) for g in gathered))
    probe = next(batches())[0]
    state = adapter_state(nm)  # under FSDP2 a collective: every rank
    if mode == "fsdp_blocks":
        extra["unsharded_alone"] = unsharded_alone
        last = neat_fx.load_checkpoint(out / "ckpt", nm, opt)
        losses.append(step(*list(batches())[last["step"]]))
        resumed = adapter_state(nm)
        extra["resume_diff"] = max(float((resumed[k] - state[k]).abs().max()) for k in state)
        extra["resume_step"] = last["step"]
        extra["foreign_unit"] = foreign_unit_error()
        extra["meta_init_diff"] = meta_sharded_init()
    if mode in ("fsdp", "fsdp_blocks"):
        # Sharded: every rank calls save_adapters (it gathers, rank 0 writes) and load_adapters.
        neat_fx.save_adapters(nm, out / "saved")
        with torch.no_grad():
            for p in params:
                p.zero_()
        neat_fx.load_adapters(nm, out / "saved")
        reloaded = adapter_state(nm)
        reload_diff = max(float((reloaded[k] - state[k]).abs().max()) for k in state)
    elif rank == 0:
        neat_fx.save_adapters(nm, out / "saved")
        reload_diff = 0.0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "adapters.safetensors"))
        # fold after: the saved adapters onto a plain (unsharded) model in this one process
        plain = neat_fx.load_adapters(build(), out / "saved")
        plain.eval()
        with torch.no_grad():
            fold_diff = float((neat_fx.fold(plain)(**probe).logits - plain(**probe).logits).abs().max())
        (out / "result.json").write_text(
            json.dumps(
                dict(losses=losses, agree=agree, world=world, fold_diff=fold_diff, reload_diff=reload_diff, **extra)
            )
        )
    if mode != "single":
        # The FSDP/DDP wrappers hold the process group; drop them so destroy_process_group really tears gloo
        # down here, not during interpreter finalization (a CI run once aborted in a rank with "terminate
        # called without an active exception", not reproduced in 18 runs since; see pytorch/pytorch#179291).
        del run, opt, params, nm
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if len(sys.argv) > 1 and sys.argv[1] != "single":
        # Everything this worker reports is written and closed; skip the interpreter's teardown of gloo's
        # threads, which is where the one CI abort most likely came from.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
