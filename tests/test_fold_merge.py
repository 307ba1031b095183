"""fold and merge_into: same function, W0 + ΔW from W0 in float32, never a second ΔW."""

import copy

import pytest
import torch

import neat_fx

import zoo
from helpers import max_diff, randomize_adapters, ref_delta, reference_model, rel_diff


@pytest.fixture
def bert_nm():
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    randomize_adapters(nm, std=0.3)
    with torch.no_grad():
        for p in nm.trainable.values():
            p.add_(0.1)
    nm.eval()
    model.eval()
    return model, nm, other


def test_fold_leaves_nm_untouched_and_training_continues(bert_nm):
    model, nm, other = bert_nm
    before = {k: v.clone() for k, v in nm.state_dict().items()}
    folded = neat_fx.fold(nm)
    after = nm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert rel_diff(folded(**other), nm(**other)) <= 1e-5
    # more training, fold again: the new fold follows, the old one does not change
    old = folded(**other).logits.detach()
    nm.train()
    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=0.5)
    nm(**other).logits.pow(2).sum().backward()
    opt.step()
    nm.eval()
    with torch.no_grad():
        assert torch.equal(folded(**other).logits, old)
        assert rel_diff(neat_fx.fold(nm)(**other), nm(**other)) <= 1e-5
        assert max_diff(nm(**other), old) > 1e-4


def test_fold_state_dict_uses_model_names(bert_nm):
    model, nm, _ = bert_nm
    folded = neat_fx.fold(nm)
    sd = folded.state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    ad = nm.adapters["bert__encoder__layer__0__attention__self__query"]
    w0 = model.get_parameter(name)
    want = (w0.double() + ref_delta(w0, ad.A, ad.B, [], [], "relu", 1.0)).float()
    assert torch.allclose(sd["model." + name], want, atol=1e-6)
    assert torch.equal(sd["model.classifier.weight"], nm.trainable["classifier"])
    # unchanged weights are shared with the model, not copied
    key = "bert.encoder.layer.0.attention.self.key.weight"
    assert folded.get_parameter("model." + key) is model.get_parameter(key)


def test_merge_into_matches_nm_and_is_idempotent(bert_nm):
    model, nm, other = bert_nm
    with torch.no_grad():
        want = nm(**other).logits.clone()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w0 = model.get_parameter(name).detach().clone()
    neat_fx.merge_into(model, nm)
    with torch.no_grad():
        assert rel_diff(model(**other).logits, want) <= 1e-5
        # nm keeps computing the same function (it now reads its own copy of W0)
        assert rel_diff(nm(**other).logits, want) <= 1e-5
    assert torch.equal(nm.weight_of(nm.sites()[0]), w0)
    merged_once = model.get_parameter(name).detach().clone()
    neat_fx.merge_into(model, nm)
    assert torch.equal(model.get_parameter(name), merged_once), "a second merge must not add ΔW again"
    with torch.no_grad():
        assert rel_diff(model(**other).logits, want) <= 1e-5
    # classifier (trained in full) written too; state_dict/save_pretrained see plain weights
    assert torch.equal(model.classifier.weight, nm.trainable["classifier"])
    assert not any("adapter" in k for k in model.state_dict())


def test_merge_after_more_training_uses_w0(bert_nm):
    model, nm, other = bert_nm
    neat_fx.merge_into(model, nm)
    nm.train()
    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=0.5)
    nm(**other).logits.pow(2).sum().backward()
    opt.step()
    nm.eval()
    neat_fx.merge_into(model, nm)
    with torch.no_grad():
        assert rel_diff(model(**other).logits, nm(**other).logits) <= 1e-5
        assert rel_diff(neat_fx.fold(nm)(**other), nm(**other)) <= 1e-5


def test_merge_into_a_fresh_copy_and_refuses_another_base(bert_nm):
    model, nm, other = bert_nm
    fresh = copy.deepcopy(model)
    neat_fx.merge_into(fresh, nm)
    with torch.no_grad():
        assert rel_diff(fresh(**other).logits, nm(**other).logits) <= 1e-5
    stranger, *_ = zoo.bert()
    with torch.no_grad():
        stranger.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)
    before = {k: v.clone() for k, v in stranger.state_dict().items()}
    with pytest.raises(neat_fx.MergeError, match="differs from the base weight"):
        neat_fx.merge_into(stranger, nm)
    assert all(torch.equal(before[k], v) for k, v in stranger.state_dict().items()), "nothing written on error"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_half_precision_computes_delta_in_float32_from_w0(dtype):
    model, example, other, patterns = zoo.home_grown()
    model.to(dtype)
    example = tuple(t.to(dtype) for t in example)
    other = tuple(t.to(dtype) for t in other)
    nm = neat_fx.transform(model, patterns, example, rank=4)
    randomize_adapters(nm, std=0.3)
    assert all(p.dtype == torch.float32 for p in nm.adapters.parameters())
    folded = neat_fx.fold(nm)
    w0 = model.w_in
    ad = nm.adapters["w_in"]
    want = (w0.double() + ref_delta(w0.float(), ad.A, ad.B, [], [], "relu", 1.0)).to(dtype)
    got = folded.model.w_in
    assert got.dtype == dtype
    # one rounding to the half type, from a float32 ΔW: at most one ulp apart from the float64 reference
    ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(1e-3)
    assert torch.all((got.double() - want.double()).abs() <= ulp * 1.01)
    with torch.no_grad():
        out_nm, out_f = nm(*other), folded(*other)
    assert out_nm.dtype == dtype
    assert max_diff(out_nm, out_f) <= 5e-2


def test_einsum_and_left_matmul_sites_fold_and_merge():
    """The sites the op table added: found with their layout and form, adapted, folded and merged into the
    model, all equal to the float64 reference."""
    model, example, other, patterns = zoo.projections()
    model.eval()
    nm = neat_fx.transform(model, patterns, example, rank=4, depth=4, activation="tanh", scale=0.5, seed=0)
    sites = {s.name: s for s in neat_fx.sites(nm)}
    assert {n: (s.kinds, s.layout) for n, s in sites.items()} == {
        "w_in": ("einsum", "out_in"),
        "w_mid": ("einsum", "in_out"),
        "w_left": ("matmul", "out_in"),
        "w_left_t": ("matmul", "in_out"),
    }
    forms = {
        n.target: n.args[3] if len(n.args) > 3 else "right"
        for n in nm.graph("eval").nodes
        if n.op == "call_module" and n.target.startswith("adapters.")
    }
    assert forms == {
        "adapters.w_in": "einsum:bsd,da->bsa;bsa,ha->bsh",
        "adapters.w_mid": "einsum:...i,ia->...a;...a,oa->...o",
        "adapters.w_left": "left",
        "adapters.w_left_t": "left",
    }
    randomize_adapters(nm, std=0.3)
    nm.eval()
    ref = reference_model(model, nm).eval()
    with torch.no_grad():
        want = ref(*other)
        assert max_diff(nm(*other), want) <= 1e-5
        folded = neat_fx.fold(nm)
        assert max_diff(folded(*other), want) <= 1e-5
        merged = neat_fx.merge_into(copy.deepcopy(model), nm)
        assert max_diff(merged(*other), want) <= 1e-5
