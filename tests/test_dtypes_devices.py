"""float32 / bfloat16 / float16 bases, and moving between devices (CUDA tests marked `gpu`)."""

import pytest
import torch

import neat_fx
from neat_fx.numerics import flat_tensors

import zoo
from helpers import call, max_diff, randomize_adapters, rel_diff


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["home_grown", "llama"])
def test_half_precision_bases(name, dtype):
    model, example, other, patterns = zoo.ZOO[name]()
    model.to(dtype).eval()
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    example = tuple(map(cast, example)) if isinstance(example, tuple) else {k: cast(v) for k, v in example.items()}
    other = tuple(map(cast, other)) if isinstance(other, tuple) else {k: cast(v) for k, v in other.items()}
    with torch.no_grad():
        base_out = call(model, other)
    nm = neat_fx.transform(model, patterns, example, rank=4)
    nm.eval()
    with torch.no_grad():
        assert max_diff(call(nm, other), base_out) == 0.0  # step 0 is exact, also in half precision
    randomize_adapters(nm, std=0.1)
    # a training step in half precision: adapters stay float32 and get float32 gradients
    nm.train()
    out = call(nm, example)
    loss = sum(t.float().pow(2).mean() for t in flat_tensors(out) if t.is_floating_point())
    loss.backward()
    for p in nm.adapters.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    nm.eval()
    folded = neat_fx.fold(nm)
    with torch.no_grad():
        got, fo = call(nm, other), call(folded, other)
    for t in flat_tensors(fo):
        if t.is_floating_point():
            assert t.dtype == dtype
    assert rel_diff(fo, got) <= 3e-2  # one half-precision rounding of W0 + ΔW apart


def test_device_constants_follow_the_module():
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=2)

    def devices():
        found = set()
        for mode in nm.modes:
            for n in nm.graph(mode).nodes:
                for v in list(n.args) + list(n.kwargs.values()):
                    if isinstance(v, torch.device):
                        found.add(v.type)
        return found

    assert devices() == {"cpu"}
    nm.to("meta")
    assert devices() == {"meta"}
    assert model.bert.embeddings.word_embeddings.weight.device.type == "meta"  # shared, so moved too
    assert all(p.device.type == "meta" for p in nm.adapters.parameters())
    model.to_empty(device="cpu")  # moved behind nm's back: rewritten at the next call
    nm.adapters.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves garbage: zeros make every index buffer valid, so the call must run
        for t in list(model.parameters()) + list(model.buffers()) + list(nm.adapters.parameters()):
            t.zero_()
    nm.eval()
    with torch.no_grad():
        out = nm(**other)
    assert devices() == {"cpu"}
    assert all(t.device.type == "cpu" for t in flat_tensors(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("capture_on", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_train_fold_merge(dtype, capture_on):
    model, example, other, patterns = zoo.bert()
    model.to(dtype)
    if capture_on == "cuda":
        model.cuda()
        example = {k: v.cuda() for k, v in example.items()}
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    nm.to("cuda")
    assert all(p.is_cuda for p in nm.parameters())
    ex = {k: v.cuda() for k, v in example.items()}
    assert all(p.is_cuda for p in nm.adapters.parameters())
    oth = {k: v.cuda() for k, v in other.items()}
    nm.train()
    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = nm(**ex).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    nm.eval()
    with torch.no_grad():
        want = nm(**oth).logits.float()
        folded = neat_fx.fold(nm)
        got = folded(**oth).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_diff(got, want) <= tol
    neat_fx.merge_into(model, nm)
    model.eval()
    with torch.no_grad():
        assert rel_diff(model(**oth).logits.float(), want) <= tol
    nm.to("cpu")
    with torch.no_grad():
        assert rel_diff(nm(**other).logits.float(), want.cpu()) <= tol
