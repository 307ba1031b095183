"""Issue 12, the parts in transform / fold / the containers: NaN example inputs named as such, float32 master
copies for parameters trained in full on a half-precision base, the model's state after a failure, two modules
sharing a model of which one merges, and call-time shape errors said in the user's terms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neat_fx

import zoo
from helpers import max_diff, randomize_adapters, reference_model


# -- NaN and inf ------------------------------------------------------------------------------------------------
def test_nan_example_inputs_are_named_as_such():
    model, example, _, patterns = zoo.home_grown()
    bad = example[0].clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(neat_fx.CaptureError, match=r"example input positional argument 0 holds 1 NaN") as info:
        neat_fx.transform(model, patterns, (bad,))
    assert "capture='fx'" not in str(info.value) and "dynamic=False" not in str(info.value)
    ids_model, ex, _, pats = zoo.bert()
    with pytest.raises(neat_fx.CaptureError, match="finite"):
        neat_fx.transform(ids_model, pats, dict(ex, inputs_embeds=torch.full((4, 12, 32), float("inf"))))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_refused_before_capture(scale):
    model, example, _, patterns = zoo.home_grown()
    with pytest.raises(neat_fx.ConfigError, match="scale must be a finite number"):
        neat_fx.transform(model, patterns, example, scale=scale, check=False)
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_whose_output_holds_nan_still_captures():
    """NaN where the eager model has NaN too is agreement, not a capture failure."""

    class NanHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return torch.cat([y, torch.log(-torch.ones_like(y[..., :1]))], dim=-1)  # a NaN column

    nm = neat_fx.transform(NanHead(), ["lin"], (torch.randn(2, 4),))
    assert torch.isnan(nm(torch.randn(3, 4))[..., -1]).all()


# -- half-precision bases with parameters trained in full ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_trained_in_full_copies_are_float32_masters_on_a_half_base(dtype):
    model, example, other, _ = zoo.bert()
    model.to(dtype)
    nm = neat_fx.transform(model, ["*query", "*value"], example, rank=4, seed=0, trainable=["classifier*"])
    assert all(p.dtype == torch.float32 for p in nm.trainable.parameters())
    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-3)
    nm.train()
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(nm(**example).logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    nm.eval()
    with torch.no_grad():
        logits = nm(**other).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    head = nm.trainable[next(iter(nm.trainable))]
    assert not torch.equal(head.to(dtype), model.classifier.weight), "the head trained"
    folded = neat_fx.fold(nm)
    assert folded.model.classifier.weight.dtype == dtype
    assert not any(n.meta.get("neat_master_cast") for n in folded.graph("eval").nodes)
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    assert merged.classifier.weight.dtype == dtype
    with torch.no_grad():
        assert max_diff(folded(**other).logits, logits) <= 1e-2 * max(1.0, float(logits.abs().max()))
        assert max_diff(merged(**other).logits, logits) <= 1e-2 * max(1.0, float(logits.abs().max()))


def test_half_base_copy_without_master_would_break():
    """Why the master copy: AdamW's first step on a float16 tensor gives non-finite values (eps underflows)."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.float16))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.tensor([1e-4, 0.0, 1e-3, 0.0], dtype=torch.float16)
    opt.step()
    assert not torch.isfinite(p).all()


# -- state after a failure; two modules on one model -----------------------------------------------------------------
def test_failed_transform_leaves_the_model_trainable(monkeypatch):
    import importlib

    tr = importlib.import_module("neat_fx.transform")  # (the package attribute `transform` is the function)

    model, example, _, patterns = zoo.home_grown()
    model.norm.weight.requires_grad_(False)  # the user's own choice, kept
    before = {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(*args, **kwargs):
        raise RuntimeError("inserting failed")

    monkeypatch.setattr(tr, "_insert_adapters", broken)
    with pytest.raises(RuntimeError, match="inserting failed"):
        neat_fx.transform(model, patterns, example)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_failed_capture_check_leaves_the_model_trainable():
    class Noisy(nn.Module):  # nondeterministic in eval: the capture check fails after the freeze
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) + torch.randn_like(x)

    model = Noisy()
    with pytest.raises(neat_fx.CaptureError, match="does not reproduce"):
        neat_fx.transform(model, ["lin"], (torch.randn(2, 4),))
    assert all(p.requires_grad for p in model.parameters())


def test_two_modules_on_one_model_one_merges_the_other_follows():
    model, example, other, patterns = zoo.home_grown()
    model.eval()
    pristine = copy.deepcopy(model)
    nm1 = neat_fx.transform(model, patterns, example, rank=4, seed=0, modes=("eval",))
    nm2 = neat_fx.transform(model, patterns, example, rank=4, seed=1, modes=("eval",))
    randomize_adapters(nm1, std=0.3, seed=1)
    randomize_adapters(nm2, std=0.3, seed=2)
    want2 = reference_model(pristine, nm2).eval()
    with torch.no_grad():
        before = nm2(*other)
        assert max_diff(before, want2(*other)) <= 1e-5
        neat_fx.merge_into(model, nm1)  # writes W0 + ΔW1 into the weights nm2 reads
        assert max_diff(nm2(*other), want2(*other)) <= 1e-5, "nm2 switched to W0, no drift"
        assert max_diff(neat_fx.fold(nm2)(*other), want2(*other)) <= 1e-5
        merged2 = neat_fx.merge_into(copy.deepcopy(pristine), nm2)
        assert max_diff(merged2(*other), want2(*other)) <= 1e-5
        assert max_diff(nm1(*other), reference_model(pristine, nm1).eval()(*other)) <= 1e-5
    # A module built on an already merged model takes the merged weights as its base (the mark is not newer).
    nm3 = neat_fx.transform(copy.deepcopy(model), patterns, example, rank=4, modes=("eval",))
    assert all(torch.equal(nm3.weight_of(s), model.get_parameter(s.name)) for s in nm3.sites())


# -- call-time shape errors ------------------------------------------------------------------------------------------
def test_sequence_longer_than_the_position_table_is_explained():
    model, example, _, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=4, modes=("eval",)).eval()
    n = model.config.max_position_embeddings + 3
    with pytest.raises(
        neat_fx.InputMismatchError,
        match=r"'input_ids' dimension 1 is 67; the model allows at most "
        r"64 there \(the model's max_position_embeddings = 64\)",
    ):
        nm(input_ids=torch.ones(2, n, dtype=torch.long), attention_mask=torch.ones(2, n, dtype=torch.long))


def test_a_specialised_batch_is_explained_with_its_fix():
    model, example, _, patterns = zoo.bert()
    one = {k: v[:1] for k, v in example.items()}
    with pytest.warns(UserWarning, match="batch size 1"):
        nm = neat_fx.transform(model, patterns, one, rank=4, modes=("eval",)).eval()
    with pytest.raises(
        neat_fx.InputMismatchError,
        match=r"dimension 0 is 4, but the capture fixed it to 1.*example "
        r"batch of 2 or more",
    ):
        nm(**example)


def test_inputs_whose_batches_disagree_are_named():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask):
            return self.lin(x) * mask[..., None]

    nm = neat_fx.transform(Masked(), ["lin"], (torch.randn(3, 5, 8), torch.ones(3, 5)), modes=("eval",)).eval()
    with pytest.raises(neat_fx.InputMismatchError, match=r"'mask' dimension 0 is 2, but 'x' dimension 0 is 4"):
        nm(torch.randn(4, 5, 8), torch.ones(2, 5))


def test_an_index_error_from_inputs_that_disagree_is_explained(monkeypatch):
    """Where no guard relates two inputs and the graph fails inside, inputs whose sizes were equal in the example
    and now differ are named (the original error chained)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, mask):
            return self.lin(x), mask.sum()

    nm = neat_fx.transform(Two(), ["lin"], (torch.randn(3, 5, 8), torch.ones(3, 5)), modes=("eval",)).eval()
    gm = nm.graph_module("eval")

    def failing(*args, **kwargs):
        raise IndexError("index 3 is out of bounds for dimension 0 with size 2")

    monkeypatch.setattr(type(gm), "__call__", failing)
    with pytest.raises(
        neat_fx.InputMismatchError,
        match=r"'mask' dimension 0 is 2, but 'x' dimension 0 is 4; they "
        r"were equal \(3\)",
    ) as info:
        nm(torch.randn(4, 5, 8), torch.ones(2, 5))
    assert isinstance(info.value.__cause__, IndexError)
    with pytest.raises(IndexError):  # inputs that agree: the error is the model's own, passed on
        nm(torch.randn(4, 5, 8), torch.ones(4, 5))


# -- capture and export errors that point at the fix -----------------------------------------------------------------
def test_train_only_capture_failure_names_the_real_options():
    """wav2vec2's default config masks with numpy in train mode (SpecAugment) and drops layers: the error points
    at the model's line, not into numpy, and names the options that help (not dynamic=False / capture='fx')."""
    import transformers

    cfg = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4,
        vocab_size=20,
    )
    x = (torch.randn(2, 4000),)
    with pytest.raises(neat_fx.CaptureError) as info:
        neat_fx.transform(transformers.Wav2Vec2ForCTC(cfg), ["*q_proj", "*v_proj"], x)
    msg = str(info.value)
    assert "modeling_wav2vec2.py" in msg and "numpy/" not in msg
    assert "mask_time_prob=0, layerdrop=0" in msg and "modes=('eval',)" in msg
    assert "dynamic=False" not in msg and "capture='fx'" not in msg
    cfg.mask_time_prob, cfg.layerdrop = 0.0, 0.0  # the fix it names works
    assert len(neat_fx.sites(neat_fx.transform(transformers.Wav2Vec2ForCTC(cfg), ["*q_proj", "*v_proj"], x))) == 4


def test_export_error_names_the_op_without_an_onnx_translation(tmp_path):
    pytest.importorskip("onnxscript")
    from neat_fx.export import ExportError, to_onnx

    lib = torch.library.Library("neat_fx_test", "DEF")  # noqa: F841  (kept alive for the test)
    lib.define("double(Tensor x) -> Tensor")
    lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
    torch.library.register_fake("neat_fx_test::double")(lambda x: torch.empty_like(x))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.ops.neat_fx_test.double(self.lin(x))

    with pytest.raises(ExportError, match=r"ops without an ONNX translation: neat_fx_test\.double\.default"):
        to_onnx(Custom(), (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_mixtral_default_experts_export_error_names_grouped_mm(tmp_path):
    pytest.importorskip("onnxscript")
    import transformers

    from neat_fx.export import ExportError, to_onnx

    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    with pytest.raises(
        ExportError,
        match=r"without an ONNX translation: transformers\.grouped_mm_fallback.*"
        r"experts_implementation='batched_mm'",
    ):
        to_onnx(model, dict(input_ids=torch.randint(0, 64, (2, 8)), use_cache=False), tmp_path / "m.onnx")


def test_a_failed_load_onto_a_plain_model_leaves_it_trainable(tmp_path):
    """The checkpoint's base fingerprints do not match this model: the transform succeeds, the check after it
    fails — the model's requires_grad flags are given back."""
    model, example, _, patterns = zoo.home_grown()
    nm = neat_fx.transform(model, patterns, example, rank=4)
    neat_fx.save_adapters(nm, tmp_path / "ad")
    other, _, _, _ = zoo.home_grown()
    with torch.no_grad():
        other.w_in.add_(1.0)  # another base
    with pytest.raises(neat_fx.AdapterMismatchError, match="fingerprint"):
        neat_fx.load_adapters(other, tmp_path / "ad", example_inputs=example)
    assert all(p.requires_grad for p in other.parameters())
