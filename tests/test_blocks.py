"""Blocks: the model's layers as units of nm (neat_fx.blocks / submodule), their hooks, activation checkpointing.

The flat captured graph is split by module into a root graph calling one unit per block; each unit runs its
layer's graph through the layer's own hooks. Checked: the structure of the split (which calls, which adapters
and weights in which unit), equality with the flat graph, hooks, checkpointing (equal gradients, fewer saved
bytes), nesting, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neat_fx
from neat_fx.memory import LiveTensorBytes
from neat_fx.units import UNITS_ATTR

import zoo
from helpers import max_diff, op_counts, randomize_adapters


def unit_calls(graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "call_module" and n.target.startswith(UNITS_ATTR + ".")]


def adapter_calls(graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target.startswith("adapters."))


def weights_read(graph) -> set[str]:
    return {n.target for n in graph.nodes if n.op == "get_attr" and n.target.startswith("model.")}


@pytest.fixture(scope="module")
def llama():
    model, ex, other, _ = zoo.llama()
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    randomize_adapters(nm, std=0.1)
    return model, nm, ex, other


def test_each_layer_is_a_unit_with_its_own_adapters_and_weights(llama):
    model, nm, _, _ = llama
    assert neat_fx.blocks(nm) == ["model.layers.0", "model.layers.1"]
    for mode in ("train", "eval"):
        runner = nm._runner(mode)
        assert unit_calls(runner.root.graph) == [f"{UNITS_ATTR}.model__layers__0", f"{UNITS_ATTR}.model__layers__1"]
        assert adapter_calls(runner.root.graph) == 0  # all-linear: every adapter lives in a layer
        for i in (0, 1):
            g = runner.units[f"model.layers.{i}"]._gm.graph
            assert adapter_calls(g) == 7  # q k v o gate up down
            assert weights_read(g) and all(t.startswith(f"model.model.layers.{i}.") for t in weights_read(g))
        # the split moves nodes, it does not add or drop ops
        flat = op_counts(nm.graph(mode), include_modules=True)
        pieces = op_counts(runner.root.graph, include_modules=True)
        for u in runner.units.values():
            pieces.update(op_counts(u._gm.graph, include_modules=True))
        assert {k: v for k, v in pieces.items() if UNITS_ATTR not in k and k != "<built-in function getitem>"} == {
            k: v for k, v in flat.items() if k != "<built-in function getitem>"
        }
    assert neat_fx.submodule(nm, "model.layers.1") is model.model.layers[1]
    assert neat_fx.submodule(nm, "model.model.layers.1") is model.model.layers[1]  # nm's own name works too
    assert nm.get_submodule("model.model.layers.1") is model.model.layers[1]


def test_units_compute_what_the_flat_graph_computes(llama):
    _, nm, ex, other = llama
    nm.eval()
    flat = [nm(**x).logits for x in (ex, other)]
    nm.set_checkpointing(True)  # forces the units in eval too (no_grad: no recompute)
    try:
        with torch.no_grad():
            units = [nm(**x).logits for x in (ex, other)]
    finally:
        nm.set_checkpointing(False)
    assert max_diff(flat, units) == 0.0


def test_hooks_on_a_layer_run_around_its_graph(llama):
    model, nm, ex, _ = llama
    nm.eval()
    ref = nm(**ex).logits
    seen = []
    layer = neat_fx.submodule(nm, "model.layers.1")
    h1 = layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", m is layer, len(args))))
    h2 = layer.register_forward_hook(lambda m, args, out: seen.append(("post", type(out).__name__)))
    try:
        out = nm(**ex).logits
    finally:
        h1.remove()
        h2.remove()
    assert [s[0] for s in seen] == ["pre", "post"] and seen[0][1] and seen[0][2] >= 1
    assert max_diff(out, ref) == 0.0
    # a forward hook's return value replaces the block's outputs, as in nn.Module
    h = layer.register_forward_hook(lambda m, args, out: tuple(o * 0 if torch.is_tensor(o) else o for o in out))
    try:
        zeroed = nm(**ex).logits
    finally:
        h.remove()
    assert max_diff(zeroed, ref) > 0


def _deep_llama(layers=12, dropout=0.1):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_dropout=dropout,
        use_cache=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(1))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _grads_and_saved(nm, ex):
    for p in nm.parameters():
        p.grad = None
    torch.manual_seed(7)  # attention dropout: the same masks with and without recomputation
    with LiveTensorBytes() as live:
        out = nm(**ex).logits
        saved = live.now - live.bytes_of(out)
        out.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in nm.named_parameters() if p.requires_grad}, saved


def test_checkpointing_gives_equal_gradients_and_keeps_far_fewer_bytes():
    model, ex = _deep_llama()
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    randomize_adapters(nm, std=0.05)
    nm.train()
    plain, saved_plain = _grads_and_saved(nm, ex)
    nm.set_checkpointing(True)
    assert nm.checkpointed == tuple(f"model.layers.{i}" for i in range(12))
    ckpt, saved_ckpt = _grads_and_saved(nm, ex)
    worst = max(float((plain[k] - ckpt[k]).abs().max() / plain[k].abs().max().clamp_min(1e-12)) for k in plain)
    assert worst < 1e-5, worst  # dropout masks replayed: the same function, only float reassociation differs
    assert any(float(g.abs().max()) > 0 for g in plain.values())
    assert saved_plain / saved_ckpt >= 3.0, (saved_plain, saved_ckpt)  # the bound; 22.7x in big_models.md


def test_composable_checkpoint_on_a_layer_is_refused_with_the_fix(llama):
    from torch.distributed._composable import checkpoint

    model, ex = _deep_llama(layers=2, dropout=0.0)
    nm = neat_fx.transform(model, "*q_proj", ex)
    checkpoint(neat_fx.submodule(nm, "model.layers.1"))  # would re-run the layer's Python forward
    with pytest.raises(neat_fx.ConfigError, match=r"nm.set_checkpointing\(\['model.layers.1'\]\)"):
        nm(**ex)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return x + self.out(torch.relu(self.inp(x)))


class Stage(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.down = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.down(x)


class Staged(nn.Module):
    """Swin's layout: stages of blocks, each stage ending with its own projection."""

    def __init__(self, d=16):
        super().__init__()
        self.stages = nn.ModuleList([Stage(d, 2), Stage(d, 3)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for s in self.stages:
            x = s(x)
        return self.head(x)


def test_nested_blocks_nest_and_checkpointing_takes_the_innermost():
    model = Staged()
    x = torch.randn(3, 5, 16)
    nm = neat_fx.transform(model, "*", (x,), seed=0)
    randomize_adapters(nm, std=0.2)
    assert neat_fx.blocks(nm) == [
        "stages.0",
        "stages.0.blocks.0",
        "stages.0.blocks.1",
        "stages.1",
        "stages.1.blocks.0",
        "stages.1.blocks.1",
        "stages.1.blocks.2",
    ]
    runner = nm._runner("train")
    assert unit_calls(runner.root.graph) == [f"{UNITS_ATTR}.stages__0", f"{UNITS_ATTR}.stages__1"]
    stage1 = runner.units["stages.1"]._gm.graph
    assert len(unit_calls(stage1)) == 3 and adapter_calls(stage1) == 1  # its blocks, and its own `down`
    assert adapter_calls(runner.root.graph) == 1  # the head
    nm.train()
    nm.set_checkpointing(True)
    assert nm.checkpointed == tuple(n for n in neat_fx.blocks(nm) if ".blocks." in n)
    nm(x).sum().backward()
    ckpt = {n: p.grad.clone() for n, p in nm.adapters.named_parameters()}
    nm.set_checkpointing(False)
    for p in nm.parameters():
        p.grad = None
    nm(x).sum().backward()
    assert max(float((p.grad - ckpt[n]).abs().max()) for n, p in nm.adapters.named_parameters()) < 1e-6
    nm.set_checkpointing(["stages.1"])  # an outer block by name
    assert nm.checkpointed == ("stages.1",)


class Shared(nn.Module):
    """One layer applied twice with the model's own code in between (weight sharing), then an unshared one.
    (Two calls back to back would form one region, run by one unit: that is allowed.)"""

    def __init__(self, d=16):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])

    def forward(self, x):
        x = self.layers[0](torch.tanh(self.layers[0](x)))
        return self.layers[1](x)


def test_a_layer_called_twice_stays_inline_and_says_why():
    model = Shared()
    x = torch.randn(2, 4, 16)
    nm = neat_fx.transform(model, "*", (x,), seed=0)
    assert neat_fx.blocks(nm) == ["layers.1"]
    with pytest.raises(neat_fx.ConfigError, match=r"'layers.0' cannot run as a unit .*called more than once"):
        neat_fx.submodule(nm, "layers.0")
    nested = neat_fx.transform(model, "*", (x,), blocks=["layers.0", "layers.0.inp"])
    with pytest.raises(neat_fx.ConfigError, match=r"'layers.0.inp' cannot run .* inside block 'layers.0'"):
        neat_fx.submodule(nested, "layers.0.inp")  # inside a layer that stays inline: inline too
    model.layers[0].register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(neat_fx.ConfigError, match=r"block 'layers.0' has forward hooks .* cannot run as a unit"):
        nm(x)


def test_bad_block_names_are_refused_before_anything_runs(llama):
    model, nm, ex, _ = llama
    with pytest.raises(neat_fx.ConfigError, match=r"blocks: 'model.layer.0' names no module .* model.layers.0"):
        neat_fx.transform(model, "all-linear", ex, blocks=["model.layer.0"])
    with pytest.raises(neat_fx.ConfigError, match=r"checkpoint: 'model.layers.7' is not a block .* model.layers.1"):
        nm.set_checkpointing(["model.layers.7"])
    assert nm.checkpointed == ()
    with pytest.raises(neat_fx.ConfigError, match=r"'model.embed_tokens' is not a block"):
        neat_fx.submodule(nm, "model.embed_tokens")
    with pytest.raises(neat_fx.ConfigError, match="submodule takes a NeatModule"):
        neat_fx.submodule(model, "model.layers.0")
    with pytest.raises(neat_fx.ConfigError, match="blocks takes True, False, a module name or a list"):
        neat_fx.transform(model, "all-linear", ex, blocks=3)
    with pytest.raises(neat_fx.ConfigError, match="checkpointing takes True, False, a module name or a list"):
        nm.set_checkpointing([0, 1])
    with pytest.raises(neat_fx.ConfigError, match="blocks takes a NeatModule"):
        neat_fx.blocks(model)
    flat = neat_fx.transform(model, "*q_proj", ex, blocks=False)
    assert neat_fx.blocks(flat) == []
    with pytest.raises(neat_fx.ConfigError, match="checkpointing needs blocks"):
        flat.set_checkpointing(True)


def test_blocks_by_name_and_checkpoint_at_transform(llama):
    model, _, ex, _ = llama
    nm = neat_fx.transform(model, "*q_proj", ex, blocks=["model.layers.*"], checkpoint=["model.layers.1"])
    randomize_adapters(nm, std=0.1, seed=3)  # B != 0: a unit that dropped its adapter would show
    assert neat_fx.blocks(nm) == ["model.layers.0", "model.layers.1"]
    assert nm.checkpointed == ("model.layers.1",)
    folded = neat_fx.fold(nm)  # fold reads the flat graph: units change nothing there
    nm.eval()
    with torch.no_grad():
        base = model(**ex).logits
        assert max_diff(nm(**ex).logits, base) > 1e-2  # the adapters change the output ...
        assert max_diff(folded(**ex).logits, nm(**ex).logits) < 1e-5  # ... and the units run them as the fold has them
    # sibling blocks inside a layer, named exactly, nest inside it
    parts = ["model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp"]
    nested = neat_fx.transform(model, "*q_proj", ex, blocks=parts, checkpoint=parts[1:])
    randomize_adapters(nested, std=0.1, seed=3)  # the same adapters as nm's
    assert neat_fx.blocks(nested) == parts
    layer = nested._runner("eval").units["model.layers.0"]._gm.graph
    assert unit_calls(layer) == [f"{UNITS_ATTR}.model__layers__0__self_attn", f"{UNITS_ATTR}.model__layers__0__mlp"]
    nested.eval()
    with torch.no_grad():
        assert max_diff(nested(**ex).logits, nm(**ex).logits) < 1e-6


def test_units_follow_merge_into():
    """merge_into rewrites nm's graph in place (nm reads its own copy of W0 from then on): the per-layer units are
    split again from the new graph, so nm computes the same function after the merge (ΔW not added twice)."""
    model, ex, other, _ = zoo.llama()
    model.eval()
    nm = neat_fx.transform(model, "all-linear", ex, seed=0)
    randomize_adapters(nm, std=0.1)
    nm.eval()
    nm.set_checkpointing(True)  # the units run (no_grad: nothing recomputed)
    try:
        with torch.no_grad():
            base = model(**other).logits
            before = nm(**other).logits
            neat_fx.merge_into(model, nm)
            after, merged = nm(**other).logits, model(**other).logits
    finally:
        nm.set_checkpointing(False)
    assert max_diff(before, base) > 1e-2  # the adapters matter
    assert max_diff(after, before) < 1e-5 and max_diff(merged, before) < 1e-5
