"""save_adapters(format="lora"): NEAT in the exact LoRA form (lora_A = Hᵀ, lora_B = B, lora_alpha = s·r).
PEFT's LoRA loads it and computes what nm computes; merge_and_unload equals merge_into; the base fingerprint
travels in the safetensors header; sites LoRA cannot name are listed; the folder cannot be loaded as NEAT."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import neat_fx
from neat_fx.io import lora

import decoders
import zoo
from helpers import max_diff, randomize_adapters


def _peft(model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()


@pytest.mark.parametrize(
    "name, patterns, options",
    [
        ("bert", ["*query", "*value"], dict(trainable=["classifier*"])),
        ("llama", ["all-linear"], dict(depth=4, activation="gelu", scale=0.5)),
        ("gpt2", ["*c_attn", "*c_fc"], {}),  # GPT-2's Conv1D: fan_in_fan_out
        ("gemma2", ["*"], {}),  # the tied head, under its nn.Linear's name
    ],
)
def test_peft_lora_loads_the_lora_form_and_computes_what_nm_computes(name, patterns, options, tmp_path):
    if name == "bert":
        model, example, _, _ = zoo.bert()
    else:
        model, example = decoders.build(name), decoders.example_inputs()
    model.eval()
    nm = neat_fx.transform(model, patterns, example, rank=4, modes=("eval",), seed=0, **options)
    randomize_adapters(nm, std=0.2, seed=3)
    if nm.trainable_names:
        with torch.no_grad():
            for p in nm.trainable.parameters():
                p.add_(0.1)
    neat_fx.save_adapters(nm, tmp_path, format="lora")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert cfg["lora_alpha"] / cfg["r"] == nm.neat_config.scale
    assert len(cfg["target_modules"]) == len(nm.sites())
    assert cfg["fan_in_fan_out"] == (name == "gpt2")

    peft_model = _peft(model, tmp_path)
    with torch.no_grad():
        want = nm(**example).logits
        got = peft_model(**example).logits
        assert max_diff(got, want) <= 1e-5 * max(1.0, want.abs().max().item())
        merged_peft = peft_model.merge_and_unload()
        merged_ours = neat_fx.merge_into(copy.deepcopy(model), nm)
        # PEFT merges a tied head into the shared tensor, so its embedding moves too (PEFT warns, issue 2777);
        # merge_into unties: compare the heads, and our embedding keeps W0.
        tied = {a for s in nm.sites() for a in s.untied_paths}
        for n in tied:
            assert torch.equal(merged_ours.get_parameter(n), model.get_parameter(n))
        for n, p in merged_ours.named_parameters(remove_duplicate=False):
            if n in tied:
                continue
            q = merged_peft.get_parameter(n)
            assert max_diff(p, q) <= 1e-5 * max(1.0, p.abs().max().item()), n


def test_lora_form_carries_the_base_fingerprint(tmp_path):
    model, example = decoders.build("llama"), decoders.example_inputs()
    nm = neat_fx.transform(model, ["*q_proj"], example, rank=2, modes=("eval",))
    neat_fx.save_adapters(nm, tmp_path, format="lora")
    base = lora.read_base(tmp_path)
    assert set(base["fingerprints"]) == {s.name.removesuffix(".weight") for s in nm.sites()}
    lora.check_base(tmp_path, model)  # the same base: fine
    with pytest.raises(neat_fx.AdapterMismatchError, match="another base model"):
        lora.check_base(tmp_path, decoders.build("llama", seed=1))


def test_sites_lora_cannot_name_are_listed(tmp_path):
    model, example, _, _ = zoo.projections()  # einsum and W @ x sites: no module LoRA could wrap
    nm = neat_fx.transform(model, ["*"], example, rank=2)
    with pytest.raises(neat_fx.AdapterMismatchError, match="exclude=") as err:
        neat_fx.save_adapters(nm, tmp_path / "x", format="lora")
    assert "einsum" in str(err.value) or "matmul" in str(err.value)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_a_lora_form_folder_is_not_loaded_as_neat_adapters(tmp_path):
    model, example = decoders.build("llama"), decoders.example_inputs()
    nm = neat_fx.transform(model, ["*q_proj"], example, rank=2, modes=("eval",))
    neat_fx.save_adapters(nm, tmp_path, format="lora")
    with pytest.raises(neat_fx.AdapterMismatchError, match="cannot be loaded back"):
        neat_fx.read_adapters(tmp_path)
