"""NEAT inside PyTorch's distributed engines, two CPU processes over gloo (`torch.distributed.run`):
DDP equals one process on the concatenated batch; FSDP2 (`fully_shard`) trains, saves, reloads and folds, as one
root unit or one unit per layer (with activation checkpointing and a checkpoint/resume of the sharded run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "dist_worker.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def run(mode: str, out: Path, nproc: int):
    cmd = (
        [sys.executable, str(WORKER), mode, str(out)]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(WORKER),
            mode,
            str(out),
        ]
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads((out / "result.json").read_text()), load_file(str(out / "adapters.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run("single", tmp_path_factory.mktemp("single"), 1)


def test_ddp_matches_one_process_on_the_whole_batch(single, tmp_path):
    res, adapters = run("ddp", tmp_path, 2)
    _, ref = single
    assert res["world"] == 2
    assert res["agree"] == [0.0] * len(res["agree"]) and len(res["agree"]) == 3  # ranks identical every step
    worst = max(float((adapters[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-6, worst
    moved = max(float(ref[k].abs().max()) for k in ref if ".B" in k)
    assert moved > 0


def test_fsdp2_trains_saves_reloads_and_folds(single, tmp_path):
    res, adapters = run("fsdp", tmp_path, 2)
    _, ref = single
    worst = max(float((adapters[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-6, worst
    assert res["reload_diff"] == 0.0  # load_adapters into the sharded module restores what was saved
    assert res["fold_diff"] < 1e-5
    assert (tmp_path / "saved" / "neat_config.json").exists()


def test_fsdp2_one_unit_per_layer_with_checkpointing_matches_one_process(single, tmp_path):
    res, adapters = run("fsdp_blocks", tmp_path, 2)
    _, ref = single
    worst = max(float((adapters[k] - ref[k]).abs().max()) for k in ref)
    assert worst < 1e-5, worst  # the bound after 3 steps; measured 4.5e-8
    # each time a layer's unit starts, its weights are whole and every other layer's still sharded (2 layers ×
    # 3 steps, the resumed step, and nothing else)
    assert res["unsharded_alone"] == [True] * 8
    assert res["reload_diff"] == 0.0 and res["fold_diff"] < 1e-5
    # a checkpoint written by the sharded run before the last step, loaded back, redoes that step exactly
    assert res["resume_step"] == 2 and res["resume_diff"] < 1e-6
    assert "model.bert.encoder.layer.0.attention" in res["foreign_unit"]
    assert "bert.encoder.layer.0, bert.encoder.layer.1" in res["foreign_unit"]
    assert (tmp_path / "ckpt" / "trainer_state.json").exists()
    # built on the meta device, sharded per layer, to_empty, loaded shard by shard: the real model's function
    assert res["meta_init_diff"] < 1e-5
