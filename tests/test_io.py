"""Adapters on disk: round trips, PEFT PEANuT interop both ways, atomic writes, refusals."""

import copy
import json

import pytest
import torch

import neat_fx
import neat_fx.io.writing as nio_writing

import zoo
from helpers import max_diff, randomize_adapters, rel_diff

peft = pytest.importorskip("peft")


def trained_nm(depth=2, activation="relu", trainable=("classifier*",)):
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(
        model, patterns, example, rank=4, depth=depth, activation=activation, scale=0.5, trainable=trainable, seed=1
    )
    randomize_adapters(nm, std=0.3)
    nm.eval()
    return model, example, other, nm


def state(nm):
    return {k: v.detach().clone() for k, v in nm.state_dict().items()}


def test_native_round_trip_onto_nm_and_onto_plain_model(tmp_path):
    model, example, other, nm = trained_nm(depth=4, activation="sin")
    with torch.no_grad():
        want = nm(**other).logits
    neat_fx.save_adapters(nm, tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapters.safetensors", "neat_config.json"]
    meta = json.loads((tmp_path / "ad" / "neat_config.json").read_text())
    assert meta["config"]["patterns"] == ["*query", "*value"] and len(meta["sites"]) == 4
    assert meta["sites"][0]["fingerprint"]["shape"] == [32, 32]

    # onto a fresh NeatModule of the same base: loaded in place
    base2 = copy.deepcopy(model)
    nm2 = neat_fx.transform(base2, ["*query", "*value"], example, rank=4, depth=4, trainable=["classifier*"])
    assert neat_fx.load_adapters(nm2, tmp_path / "ad") is nm2
    nm2.eval()
    with torch.no_grad():
        assert max_diff(nm2(**other).logits, want) == 0.0
    # onto the plain model: transformed with the saved options, then loaded
    nm3 = neat_fx.load_adapters(copy.deepcopy(model), tmp_path / "ad", example_inputs=example).eval()
    assert nm3.neat_config.activation == "sin" and nm3.neat_config.depth == 4
    with torch.no_grad():
        assert max_diff(nm3(**other).logits, want) == 0.0


def test_load_onto_another_base_fails_and_changes_nothing(tmp_path):
    model, example, other, nm = trained_nm()
    neat_fx.save_adapters(nm, tmp_path / "ad")
    stranger, ex2, _, _ = zoo.bert()
    with torch.no_grad():
        for p in stranger.parameters():
            p.mul_(-1.5)
    nm2 = neat_fx.transform(stranger, ["*query", "*value"], ex2, rank=4, trainable=["classifier*"])
    before = state(nm2)
    with pytest.raises(neat_fx.AdapterMismatchError, match="base weight differs"):
        neat_fx.load_adapters(nm2, tmp_path / "ad")
    after = state(nm2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_refuses_other_rank_and_other_sites(tmp_path):
    model, example, other, nm = trained_nm()
    neat_fx.save_adapters(nm, tmp_path / "ad")
    other_rank = neat_fx.transform(
        copy.deepcopy(model), ["*query", "*value"], example, rank=8, trainable=["classifier*"]
    )
    with pytest.raises(neat_fx.AdapterMismatchError, match="rank=4"):
        neat_fx.load_adapters(other_rank, tmp_path / "ad")
    other_sites = neat_fx.transform(copy.deepcopy(model), ["*query"], example, rank=4, trainable=["classifier*"])
    with pytest.raises(neat_fx.AdapterMismatchError, match="not adapted in nm"):
        neat_fx.load_adapters(other_sites, tmp_path / "ad")


def test_missing_and_corrupt_folders(tmp_path):
    model, example, other, nm = trained_nm()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        neat_fx.load_adapters(nm, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        neat_fx.load_adapters(nm, tmp_path / "empty")
    # weights of one save with the config of another: caught by the checksum
    neat_fx.save_adapters(nm, tmp_path / "a")
    randomize_adapters(nm, seed=5)
    neat_fx.save_adapters(nm, tmp_path / "b")
    (tmp_path / "a" / "adapters.safetensors").write_bytes((tmp_path / "b" / "adapters.safetensors").read_bytes())
    with pytest.raises(neat_fx.AdapterMismatchError, match="checksum"):
        neat_fx.load_adapters(nm, tmp_path / "a")
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("x")
        neat_fx.save_adapters(nm, tmp_path / "file")


def test_failed_save_leaves_previous_save_intact(tmp_path, monkeypatch):
    model, example, other, nm = trained_nm()
    neat_fx.save_adapters(nm, tmp_path / "ad")
    good = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    randomize_adapters(nm, seed=9)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nio_writing, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        neat_fx.save_adapters(nm, tmp_path / "ad")
    now = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    assert now == good, "no temporary file left, previous files unchanged"


def _peft_model(base, depth, act, scaling):
    cfg = peft.PeanutConfig(
        r=4, depth=depth, act_fn=act, scaling=scaling, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _train(module, inputs, steps=3, lr=1e-2):
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        labels = torch.randint(0, 3, (inputs["input_ids"].shape[0],), generator=g)
        logits = module(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()


@pytest.mark.parametrize("depth,act", [(0, "relu"), (1, "gelu")])
def test_peft_trained_peanut_loads_into_neat_fx(tmp_path, depth, act):
    base, example, other, _ = zoo.bert()
    base.eval()
    with torch.no_grad():
        base_out = base(**other).logits
    pm = _peft_model(base, depth, act, 0.5)
    _train(pm, example)
    with torch.no_grad():
        want = pm(**other).logits
    assert max_diff(want, base_out) > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    nm = neat_fx.load_adapters(copy.deepcopy(base), tmp_path / "peft", example_inputs=example).eval()
    assert nm.neat_config.depth == 2 + 2 * depth and nm.neat_config.activation == act and nm.neat_config.scale == 0.5
    assert set(nm.trainable_names.values()) == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        assert rel_diff(nm(**other).logits, want) <= 1e-5


@pytest.mark.parametrize("depth,act", [(2, "silu"), (4, "tanh")])
def test_neat_fx_trained_adapters_load_into_peft(tmp_path, depth, act):
    base, example, other, _ = zoo.bert()
    base.eval()
    nm = neat_fx.transform(
        copy.deepcopy(base),
        ["*query", "*value"],
        example,
        rank=4,
        depth=depth,
        activation=act,
        scale=0.5,
        trainable=["classifier*"],
    )
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.B.normal_(std=0.1)
    _train(nm, example)
    with torch.no_grad():
        want = nm(**other).logits
        assert max_diff(want, base(**other).logits) > 1e-3
    neat_fx.save_adapters(nm, tmp_path / "out", format="peft")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "PEANUT" and cfg["depth"] == (depth - 2) // 2 and cfg["modules_to_save"] == ["classifier"]
    )
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        assert rel_diff(pm(**other).logits, want) <= 1e-5


def test_peft_format_refuses_sites_peft_cannot_hold(tmp_path):
    model, example, other, patterns = zoo.gpt2()
    nm = neat_fx.transform(model, patterns, example, rank=2)
    with pytest.raises(neat_fx.AdapterMismatchError, match="nn.Linear modules only"):
        neat_fx.save_adapters(nm, tmp_path / "g", format="peft")
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=2, activation="sin")
    with pytest.raises(neat_fx.AdapterMismatchError, match="sin"):
        neat_fx.save_adapters(nm, tmp_path / "s", format="peft")
