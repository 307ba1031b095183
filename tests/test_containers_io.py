"""Inputs and outputs in containers torch.export handles differently: example inputs a forward takes through
`**kwargs` (dynamic shapes bound to the signature), and output classes registered as pytree nodes without key
paths (diffusers' output dataclasses) — through transform, a train step, fold and to_onnx."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import neat_fx
from neat_fx import capture as cap

from helpers import max_diff, randomize_adapters, reference_model, tensors

pytest.importorskip("onnxruntime")
from neat_fx.export import session, to_onnx  # noqa: E402

TOL = 1e-4  # fp32 ONNX Runtime vs eager, relative to max(1, |reference|)


class KwargsModel(nn.Module):
    """A home-grown forward taking the mask and a flag through **kwargs, as LLaVA takes use_cache."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, 5)

    def forward(self, input_ids, **kwargs):
        h = self.emb(input_ids)
        mask = kwargs["attention_mask"].to(h.dtype)
        scores = self.q(h) @ h.transpose(1, 2) + (1 - mask[:, None, :]) * -1e4
        h = h + torch.softmax(scores, -1) @ self.v(h)
        if kwargs.get("use_cache", True):
            h = h * 2
        return self.out(torch.tanh(h))


def kwargs_batch(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 2 :] = 0
    return dict(input_ids=torch.randint(0, 50, (b, s), generator=g), attention_mask=mask, use_cache=False)


def rel(ref, got):
    ref = [t.detach().double().numpy() for t in tensors(ref)]
    assert len(ref) == len(got)
    return max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got))


def ort_run(path, inputs):
    sess = session(path, "cpu")
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: inputs[n].numpy() for n in names})


def test_dynamic_shapes_name_the_inputs_a_var_keyword_takes():
    model, x = KwargsModel(), kwargs_batch(2, 7, 0)
    spec = cap.dynamic_shapes_for(model.forward, (), x, True)
    assert set(spec) == {"input_ids", "attention_mask", "use_cache"} and spec["use_cache"] is None
    assert sorted(spec["attention_mask"]) == [0, 1]
    # a caller's spec may nest them under the **kwargs parameter's name, as torch.export documents
    nested = {"input_ids": {0: "b"}, "kwargs": {"attention_mask": {0: "b"}, "use_cache": None}}
    assert cap.dynamic_shapes_for(model.forward, (), x, nested) == {
        "input_ids": {0: "b"},
        "attention_mask": {0: "b"},
        "use_cache": None,
    }
    # *args: one entry holding a tuple, as torch.export binds it
    star = cap.auto_dynamic_shapes(lambda x, *rest: x, (torch.ones(2, 3), torch.ones(2, 3), torch.ones(2)), {})
    assert set(star) == {"x", "rest"} and len(star["rest"]) == 2
    view = cap.named_forward(model, (), x)
    assert view is not model and list(view.named_parameters()) == list(model.named_parameters())
    assert "forward" not in vars(model)  # the model itself is not written to
    assert cap.named_forward(model, (), dict(input_ids=x["input_ids"])) is model


def test_var_keyword_inputs_transform_train_fold_export(tmp_path):
    model = KwargsModel().eval()
    example = kwargs_batch(2, 7, 0)
    nm = neat_fx.transform(model, ["q", "v"], example, rank=4)
    assert {s.name for s in nm.sites()} == {"q.weight", "v.weight"}
    randomize_adapters(nm, std=0.3)
    ref = reference_model(model, nm).eval()
    nm.eval()
    other = kwargs_batch(3, 5, 1)  # another batch size and length: both stay dynamic
    with torch.no_grad():
        assert max_diff(nm(**other), ref(**other)) <= 1e-5
        assert max_diff(nm(**example), ref(**example)) <= 1e-5

    nm.train()
    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
    before = {k: p.detach().clone() for k, p in nm.named_parameters() if p.requires_grad}
    nm(**other).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(before[k], p) for k, p in nm.named_parameters() if p.requires_grad)
    nm.eval()

    folded = neat_fx.fold(nm)
    with torch.no_grad():
        want = nm(**other)
        assert max_diff(folded(**other), want) <= 1e-5

    report = to_onnx(nm, example, tmp_path / "kw.onnx")
    assert report.max_rel_diff <= TOL and len(report.parity) == 2
    assert report.parity[0]["shapes"] != report.parity[1]["shapes"]
    assert "attention_mask" in report.input_names and "input_ids" in report.input_names
    assert rel(want, ort_run(report.path, other)) <= TOL


def test_hugging_face_input_through_var_keyword():
    """Transformers 5 takes some inputs through **kwargs (TransformersKwargs: output_hidden_states here; LLaVA's
    use_cache): captured with the batch and length dynamic, equal to the merged model on another shape."""
    import copy

    import decoders

    model = decoders.build("llama")
    example = dict(decoders.example_inputs(), output_hidden_states=False)
    nm = neat_fx.transform(model, ["*q_proj", "*v_proj"], example, rank=4)
    randomize_adapters(nm, std=0.3)
    nm.eval()
    merged = copy.deepcopy(model)
    neat_fx.merge_into(merged, nm)
    ids, mask = decoders.left_padded((11, 4, 7))
    other = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        assert max_diff(nm(**other, output_hidden_states=False).logits, merged(**other).logits) <= 1e-5


@dataclass
class DiffusionOutput:
    """An output dataclass registered the way diffusers registers its BaseOutput subclasses: no key paths."""

    sample: torch.Tensor
    hidden: torch.Tensor


pytree.register_pytree_node(
    DiffusionOutput, lambda o: ([o.sample, o.hidden], None), lambda values, _: DiffusionOutput(*values)
)


class Unkeyed:
    """A non-dataclass output registered without key paths: its children are named by position."""

    def __init__(self, a, b):
        self.a, self.b = a, b


pytree.register_pytree_node(Unkeyed, lambda o: ([o.a, o.b], None), lambda values, _: Unkeyed(*values))


class Denoiser(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(1)
        self.proj_in = nn.Linear(d, 32)
        self.proj_out = nn.Linear(32, d)

    def forward(self, x):
        h = torch.nn.functional.silu(self.proj_in(x))
        return DiffusionOutput(sample=x + self.proj_out(h), hidden=h)


def test_key_paths_of_nodes_registered_without_them():
    with pytest.raises(ValueError, match="flatten_with_keys_fn"):
        pytree.tree_flatten_with_path(DiffusionOutput(torch.ones(1), torch.ones(1)))
    out = {"out": DiffusionOutput(torch.ones(1), torch.zeros(1)), "more": (Unkeyed(torch.ones(2), None), 3)}
    paths = [pytree.keystr(p) for p, _ in cap.leaves_with_path(out)]
    assert paths == ["['out'].sample", "['out'].hidden", "['more'][0][0]", "['more'][0][1]", "['more'][1]"]
    nan = DiffusionOutput(torch.ones(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(neat_fx.CaptureError, match=r"example input positional argument 0\.hidden holds 1 NaN"):
        cap.refuse_non_finite((nan,), {})
    keyed = {"a": [torch.ones(1), (torch.ones(2), None)]}
    assert cap.leaves_with_path(keyed) == pytree.tree_flatten_with_path(keyed)[0]


def test_output_class_without_key_paths_transform_fold_export(tmp_path):
    model = Denoiser().eval()
    g = torch.Generator().manual_seed(2)
    example, other = (torch.randn(2, 7, 16, generator=g),), (torch.randn(3, 4, 16, generator=g),)
    nm = neat_fx.transform(model, ["proj_in", "proj_out"], example, rank=4)
    randomize_adapters(nm, std=0.3)
    nm.eval()
    ref = reference_model(model, nm).eval()
    with torch.no_grad():
        got = nm(*other)
        assert type(got) is DiffusionOutput and max_diff(got, ref(*other)) <= 1e-5
        folded = neat_fx.fold(nm)(*other)
        assert type(folded) is DiffusionOutput and max_diff(folded, got) <= 1e-5

    report = to_onnx(nm, example, tmp_path / "d.onnx")
    assert report.output_names == ["sample", "hidden"]
    assert report.max_rel_diff <= TOL and len(report.parity) == 2
    sess = session(report.path, "cpu")
    assert rel(got, sess.run(None, {sess.get_inputs()[0].name: other[0].numpy()})) <= TOL
