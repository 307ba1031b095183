"""neat_fx.serve: several adapters on one captured base. Each adapter computes what its own nm computes, a
mixed batch computes every row as its own adapter would (in one pass per group of adapters where the rows allow
it, one sub-batch per adapter where they do not), switching under torch.compile compiles nothing new,
and adapters of another base or unknown names are refused before anything runs."""

from __future__ import annotations

import pytest
import torch

import neat_fx
from neat_fx.serving import BANK

import zoo
from helpers import max_diff, randomize_adapters


@pytest.fixture
def two_adapters(bert_adapters):
    """Two adapters of one BERT that differ in everything a bank must absorb: sites, rank, depth, activation,
    a head trained in full; and a third saved in PEFT's PEANuT format (conftest.py, shared with
    test_serving_onnx.py)."""
    return bert_adapters


def test_each_adapter_computes_what_its_module_computes(two_adapters):
    model, example, other, modules, root = two_adapters
    before = {n: t.clone() for n, t in model.state_dict().items()}
    bank = neat_fx.serve(model, {n: root / n for n in modules}, example)
    counts = {}
    for node in bank.graph("eval").nodes:
        if node.meta.get(BANK):
            counts[node.meta[BANK]] = counts.get(node.meta[BANK], 0) + 1
    # the union of the three adapters' sites, one bank node each
    assert len(counts) == len({s.name for m in modules.values() for s in m.sites()}) and set(counts.values()) == {1}
    with torch.no_grad():
        for name, nm in modules.items():
            bank.set_adapter(name)
            assert bank.active == name
            want = nm(**other).logits
            assert max_diff(bank(**other).logits, want) <= 1e-5 * want.abs().max().item()
    assert all(torch.equal(model.state_dict()[n], before[n]) for n in before)  # the base is untouched


class _Counting:
    """Wraps a captured graph to count the passes a call makes."""

    def __init__(self, gm):
        self.gm, self.calls = gm, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.gm(*args, **kwargs)


def _mixed_rows_match(bank, modules, batch, names, tol=1e-5):
    with torch.no_grad():
        mixed = bank(**batch, adapter_names=names).logits
        for i, name in enumerate(names):
            row = modules[name](**{k: v[i : i + 1] for k, v in batch.items()}).logits
            assert max_diff(mixed[i : i + 1], row) <= tol * row.abs().max().item()


def test_mixed_batch_rows_equal_their_own_adapter(two_adapters, monkeypatch):
    """Every row of a mixed batch is what its own adapter computes. Every site's activation has the batch first
    (BERT): one pass per group of adapters that share their parameters trained in full — here 'a' (its own head)
    and 'b' + 'c' (the base head)."""
    model, example, other, modules, root = two_adapters
    bank = neat_fx.serve(model, [root / "a", root / "b", root / "c"], example)  # named after the folders
    assert bank.rowwise
    batch = {k: torch.cat([v, v], 0) for k, v in other.items()}  # 6 rows
    counting = _Counting(bank._per_call_graph())  # the graph mixed calls run, their adapters as its inputs
    monkeypatch.setitem(bank.__dict__, "_per_call_gm", (bank._graph_device, counting))
    bank.set_adapter("c")
    _mixed_rows_match(bank, modules, batch, ["b", "c", "c", "b", "b", "c"])
    assert counting.calls == 1
    _mixed_rows_match(bank, modules, batch, ["b", "a", "c", "a", "b", "b"])
    assert counting.calls == 1 + 2
    assert bank.active == "c"  # the mixed calls left the active adapter as it was (they never write it)


def test_mixed_batch_with_flattened_rows_runs_per_adapter(tmp_path):
    """GPT-2's Conv1D reads its input as (batch·positions, d): no per-row pick is possible, so one sub-batch per
    adapter — still every row as its own adapter computes it."""
    model, example, other, patterns = zoo.gpt2()
    model.eval()
    modules = {}
    for i, name in enumerate(("x", "y")):
        nm = neat_fx.transform(model, patterns, example, rank=2 + i, modes=("eval",))
        randomize_adapters(nm, std=0.2, seed=i)
        neat_fx.save_adapters(nm, tmp_path / name)
        modules[name] = nm.eval()
    bank = neat_fx.serve(model, {n: tmp_path / n for n in modules}, example)
    assert not bank.rowwise
    batch = {k: torch.cat([v, v], 0) for k, v in other.items()}
    _mixed_rows_match(bank, modules, batch, ["y", "x", "x", "y", "x", "y"])


def test_switching_under_torch_compile_compiles_nothing_new(two_adapters):
    from torch._dynamo.utils import counters

    model, example, other, modules, root = two_adapters
    bank = neat_fx.serve(model, {"a": root / "a", "b": root / "b"}, example)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(bank, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        bank.set_adapter("a")
        out_a = compiled(**other).logits
        frames = counters["stats"]["unique_graphs"]
        bank.set_adapter("b")
        out_b = compiled(**other).logits
        bank.set_adapter("a")
        again = compiled(**other).logits
    assert counters["stats"]["unique_graphs"] == frames >= 1  # no recompilation on a switch
    assert max_diff(out_a, modules["a"](**other).logits) <= 1e-5 * out_a.abs().max().item()
    assert max_diff(out_b, modules["b"](**other).logits) <= 1e-5 * out_b.abs().max().item()
    assert torch.equal(again, out_a)
    torch._dynamo.reset()


def test_unknown_names_are_refused(two_adapters):
    model, example, other, _, root = two_adapters
    bank = neat_fx.serve(model, {"a": root / "a", "b": root / "b"}, example)
    with pytest.raises(neat_fx.ConfigError, match="no adapter named 'z'.*'a', 'b'"):
        bank.set_adapter("z")
    with pytest.raises(neat_fx.ConfigError, match="no adapter named 'z'"):
        bank(**other, adapter_names=["a", "z", "b"])
    with pytest.raises(neat_fx.ConfigError, match="2 names for a batch of 3"):
        bank(**other, adapter_names=["a", "b"])
    assert bank.active == "a"


def test_adapters_of_another_base_are_refused(two_adapters, tmp_path):
    model, example, _, _, root = two_adapters
    other_model, _, _, _ = zoo.bert()
    with torch.no_grad():
        for p in other_model.parameters():
            p.mul_(1.5)  # same architecture, other weights
    with pytest.raises(neat_fx.AdapterMismatchError, match="'a'.*another base weight"):
        neat_fx.serve(other_model.eval(), {"a": root / "a", "b": root / "b"}, example)
    llama, lex, _, _ = zoo.llama()
    with pytest.raises(neat_fx.AdapterMismatchError, match="not a parameter of the model"):
        neat_fx.serve(llama, {"a": root / "a"}, lex)
    with pytest.raises(neat_fx.ConfigError, match="list of folders"):
        neat_fx.serve(model, 123, example)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        neat_fx.serve(model, {"x": tmp_path / "missing"}, example)
