"""transform → train → fold on randomly initialised architectures: structure (op counts) and numbers
(against an independent materialised reference), on an input of another batch size and length."""

import copy

import pytest
import torch

import neat_fx
from neat_fx import capture as cap
from neat_fx.numerics import flat_tensors

import zoo
from helpers import call, max_diff, op_counts, randomize_adapters, reference_model

LINEAR_OPS = (
    "aten.linear.default",
    "aten.addmm.default",
    "aten.mm.default",
    "aten.matmul.default",
    "aten.einsum.default",
)
GENERIC = [n for n in zoo.ZOO if n != "tied"]


def plain_capture_counts(model, example, mode="eval"):
    args, kwargs = cap.split_example_inputs(example)
    c = cap.capture(model, args, kwargs, method="export", modes=(mode,))[mode]
    return op_counts(c.graph)


@pytest.mark.parametrize("name", GENERIC)
def test_transform_train_fold(name):
    model, example, other, patterns = zoo.ZOO[name]()
    model.eval()
    with torch.no_grad():
        base_out = call(model, other)
    plain = plain_capture_counts(model, example)
    plain_full = plain_capture_counts_full(model, example)  # before transform freezes the weights
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    nm = neat_fx.transform(model, patterns, example, rank=4, depth=4, activation="sin", scale=0.5, seed=0)

    # structure: one adapter call per linear use, linear ops themselves unchanged
    sites = neat_fx.sites(nm)
    assert len(sites) >= len(patterns)
    for mode in ("train", "eval"):
        counts = op_counts(nm.graph(mode), include_modules=True)
        adapter_calls = sum(v for k, v in counts.items() if k.startswith("adapters."))
        uses_in_mode = sum(s.uses for s in sites) // 2
        assert adapter_calls == uses_in_mode
    eval_counts = op_counts(nm.graph("eval"))
    assert {k: eval_counts[k] for k in LINEAR_OPS} == {k: plain[k] for k in LINEAR_OPS}

    # trainable = adapters only; base frozen and shared, not copied
    trainable = {n for n, p in nm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    for s in sites:
        assert nm.model.get_parameter(s.name) is model.get_parameter(s.name)

    # step 0: B = 0, nm computes the model's function (another batch size and length)
    nm.eval()
    with torch.no_grad():
        assert max_diff(call(nm, other), base_out) <= 1e-5

    # numbers: against the materialised float64 reference, on a non-trivial adapter
    randomize_adapters(nm, std=0.3)
    ref = reference_model(model, nm).eval()
    with torch.no_grad():
        got, want = call(nm, other), call(ref, other)
    scale = max(1.0, max(t.abs().max().item() for t in flat_tensors(want) if t.is_floating_point()))
    assert max_diff(got, base_out) > 1e-3, "the adapters should change the output in this test"
    assert max_diff(got, want) <= 1e-5 * scale

    # a few training steps touch adapters only
    nm.train()
    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = call(nm, example)
        loss = sum(t.float().pow(2).mean() for t in flat_tensors(out) if t.is_floating_point())
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, frozen_before[n]), f"base weight {n} changed during training"
        assert p.grad is None

    # fold: same function, no adapter ops, op counts of a plain capture
    nm.eval()
    folded = neat_fx.fold(nm)
    folded.eval()
    with torch.no_grad():
        assert max_diff(call(folded, other), call(nm, other)) <= 1e-5 * scale
    assert op_counts(folded.graph("eval"), include_modules=True) == plain_full
    assert not any("adapters" in n for n, _ in folded.named_parameters())
    assert not any(p.requires_grad for p in folded.parameters())


def plain_capture_counts_full(model, example):
    args, kwargs = cap.split_example_inputs(example)
    # both modes, as transform captures: the eval graph derived from the train graph may keep a train-mode layout
    # no-op (BERT's sdpa output .contiguous()) that an eval-only capture does not record
    c = cap.capture(model, args, kwargs, method="export", modes=("train", "eval"))["eval"]
    counts = op_counts(c.graph, include_modules=True)
    # our graphs hold the guard module under extras.<mode>__…; a plain capture names it _guards_fn
    return {("extras.eval___guards_fn" if k == "_guards_fn" else k): v for k, v in counts.items()}


def test_dropout_follows_train_and_eval():
    model, example, other, patterns = zoo.bert()
    model.config.hidden_dropout_prob = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    nm = neat_fx.transform(model, patterns, example)
    nm.train()
    assert nm.training and model.training
    with torch.no_grad():
        a, b = nm(**other).logits, nm(**other).logits
    assert not torch.equal(a, b), "dropout must be active in train mode"
    nm.eval()
    model.eval()
    with torch.no_grad():
        a, b = nm(**other).logits, nm(**other).logits
        ref = model(**other).logits
    assert torch.equal(a, b)
    assert max_diff(a, ref) <= 1e-6


def test_fx_capture_route():
    model, example, other, patterns = zoo.home_grown()
    nm = neat_fx.transform(model, patterns, example, capture="fx", rank=3)
    assert {s.name for s in nm.sites()} == {"w_in", "w_mid", "w_out"}
    randomize_adapters(nm)
    ref = reference_model(model, nm)
    with torch.no_grad():
        assert max_diff(nm(*other), ref(*other)) <= 1e-5
    folded = neat_fx.fold(nm)
    with torch.no_grad():
        assert max_diff(folded(*other), ref(*other)) <= 1e-5


def test_fx_route_lowers_nn_linear():
    model, example, other, _ = zoo.cnn()
    nm = neat_fx.transform(model, ["head"], example, capture="fx")
    counts = op_counts(nm.graph("eval"), include_modules=True)
    assert counts["adapters.head"] == 1
    assert not any(k == "model.head" for k in counts)


def test_tied_weights_one_adapter_and_untied_fold():
    model, example, other, _ = zoo.tied()
    nm = neat_fx.transform(model, ["shared", "head"], example, rank=4)
    sites = {s.name: s for s in nm.sites()}
    # shared.weight is used by two linear ops: one adapter, two uses per graph
    assert set(sites) == {"shared.weight", "emb.weight"}
    assert sites["shared.weight"].uses == 4 and sites["emb.weight"].uses == 2
    assert "head.weight" in sites["emb.weight"].aliases
    assert sites["emb.weight"].shared_with_other_ops and not sites["shared.weight"].shared_with_other_ops
    assert len(nm.adapters) == 2
    randomize_adapters(nm, std=0.3)

    def reference(ids):
        # the embedding keeps W0; both uses of `shared` and the head get W0 + ΔW
        ws = model.shared.weight
        ads, adh = nm.adapters["shared"], nm.adapters["emb"]
        from helpers import ref_delta

        d_s = ref_delta(ws, ads.A, ads.B, [], [], "relu", 1.0).float()
        d_h = ref_delta(model.emb.weight, adh.A, adh.B, [], [], "relu", 1.0).float()
        h = model.emb(ids)
        h = torch.relu(torch.nn.functional.linear(h, ws + d_s, model.shared.bias))
        h = torch.nn.functional.linear(h, ws + d_s, model.shared.bias)
        return h @ (model.emb.weight + d_h).t()

    with torch.no_grad():
        want = reference(*other)
        assert max_diff(nm(*other), want) <= 1e-5
        folded = neat_fx.fold(nm)
        assert max_diff(folded(*other), want) <= 1e-5
        # the embedding still reads W0 in the folded module
        emb = [n for n in folded.graph("eval").nodes if n.target is torch.ops.aten.embedding.default]
        assert len(emb) == 1
        assert torch.equal(cap.resolve_attr(folded, emb[0].args[0].target), model.emb.weight)
    # merge_into unties like fold: the head gets its own W0 + ΔW, the embedding keeps W0; nm computes the same
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    assert merged.head.weight is not merged.emb.weight
    assert torch.equal(merged.emb.weight, model.emb.weight)
    with torch.no_grad():
        assert max_diff(merged(*other), want) <= 1e-5
        neat_fx.merge_into(model, nm)  # the model nm shares: nm keeps W0 for both of its readers
        assert model.head.weight is not model.emb.weight
        assert max_diff(nm(*other), want) <= 1e-5 and max_diff(model(*other), want) <= 1e-5
        neat_fx.merge_into(model, nm)  # again: idempotent
        assert max_diff(model(*other), want) <= 1e-5


def test_summary_and_counts():
    model, example, _, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=8, trainable=["classifier*"])
    text = nm.summary()
    assert "bert.encoder.layer.0.attention.self.query.weight" in text and "trained in full" in text
    trainable, total = nm.parameter_counts()
    # 4 sites of d_out 32: 2·r·d_out each, plus the classifier (32·3 + 3)
    assert trainable == 4 * 2 * 8 * 32 + 32 * 3 + 3
    assert total == sum(p.numel() for p in model.parameters()) + 4 * 2 * 8 * 32
    assert sum(p.numel() for p in nm.parameters() if p.requires_grad) == trainable
