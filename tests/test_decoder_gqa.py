"""The fast with-past graph (neat_fx/export/gqa.py): which layers take GroupQueryAttention + RotaryEmbedding with
packed projections, the torch reference of the two contrib ops against the model's own code, the logits= and
attention= options, and the per-layer report. (Families, tokens and op counts of the exported files:
tests/test_decoder_onnx.py.)"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import neat_fx
from neat_fx.export import decoder as dec
from neat_fx.export import generate, gqa, session, to_onnx

import decoders
from helpers import randomize_adapters

TASK = "text-generation-with-past"


def _wrapper(name: str):
    model = decoders.build(name, **(decoders.GQA_ROTARY if name == "llama" else {}))
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    src, weights, _ = dec.source(neat_fx.fold(nm))
    layout = dec.probe_layout(src, weights, decoders.example_inputs()["input_ids"])
    the_plan = gqa.plan(src, layout.position_ids)
    return dec.WithPast(src, weights, layout, fast=the_plan, last_logits=True).eval(), layout, the_plan


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_fast_layers_compute_the_models_own_numbers_in_torch(name):
    """The torch reference of GroupQueryAttention / RotaryEmbedding (what ONNX Runtime computes, on left-padded
    full-length rows) with the packed weights equals the model's own code: a left-padded prefill, then 14 decode
    steps (past Mistral's window of 12)."""
    wrapper, layout, the_plan = _wrapper(name)
    assert [la.fast for la in the_plan.layers] == [True, True]
    assert all(la.mlp for la in the_plan.layers)
    if name == "mistral":
        assert [la.window for la in the_plan.layers] == [12, 12]
    ids, mask = decoders.left_padded((9, 5))
    # the positions the export's parity check feeds both sides: each token's column where the op rotates q/k
    # itself (LLaMA's heads of 16; then the cached keys are the reference's too), else the real-token count
    where = dec._reference_positions(wrapper)
    assert (where is dec.positions) == (name != "llama")
    past_fast = past_ref = past_own = layout.empty_past(2, 0)
    step_ids = ids
    with torch.no_grad():
        for _ in range(15):
            args = [step_ids, mask, where(mask, step_ids.shape[1])]
            fast = wrapper(*args, *past_fast)
            with wrapper.reference():
                ref = wrapper(*args, *past_ref)
                # the model's own code at the runner's positions, on its own cache: the same logits (rotary
                # attention sees distances only; a left-padded row's real tokens are contiguous)
                own = wrapper(step_ids, mask, dec.positions(mask, step_ids.shape[1]), *past_own)
            assert fast[0].shape == (2, 1, decoders.VOCAB)
            torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast[0], own[0], rtol=1e-4, atol=1e-5)
            for f, r in zip(fast[1:], ref[1:]):  # the cache at the real positions
                real = mask.bool()
                torch.testing.assert_close(f.transpose(1, 2)[real], r.transpose(1, 2)[real], rtol=1e-4, atol=1e-5)
            past_fast, past_ref, past_own = fast[1:], ref[1:], own[1:]
            step_ids = ref[0][:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)


def test_plan_keeps_unknown_layers_on_the_models_code_and_says_why():
    import transformers as T

    cfg = T.LlamaConfig(**decoders._common(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    dynamic = gqa.plan(T.LlamaForCausalLM(cfg).eval(), True)
    assert not dynamic.fast and "rotary type 'dynamic'" in dynamic.describe()[0]
    assert dynamic.describe()[0].startswith("attention: layers 0–1 the model's own code")
    gemma = gqa.plan(decoders.build("gemma2"), True)
    assert not gemma.fast and "(soft-capped attention)" in gemma.describe()[0]
    no_positions = gqa.plan(decoders.build("llama"), False)
    assert not no_positions.fast and "position_ids" in no_positions.describe()[0]


def test_logits_all_and_attention_model(tmp_path):
    """logits="all": every position (scoring) equal to PyTorch's at the real ones; attention="model": the model's
    own attention (MultiHeadAttention after onnxscript's fusions), no GroupQueryAttention; same greedy tokens."""
    model = decoders.build("llama")
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    path = tmp_path / "all.onnx"
    report = to_onnx(nm, decoders.example_inputs(), path, task=TASK, logits="all", attention="model")
    assert report.fused_ops.get("MultiHeadAttention") == 2 and "GroupQueryAttention" not in report.op_counts
    assert "attention: the model's own code on every layer (attention='model')" in report.notes
    assert "logits at every position" in report.notes
    out = {o.name: o for o in onnx.load(str(path)).graph.output}["logits"]
    assert out.type.tensor_type.shape.dim[1].dim_param == "sequence_length"

    ids, mask = decoders.left_padded((9, 5))
    sess = session(path, "cpu")
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": dec.positions(mask, 9).numpy()}
    for i in range(2):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((2, 2, 0, model.config.head_dim), np.float32)
    got = torch.from_numpy(sess.run(["logits"], feed)[0])
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    with torch.no_grad():
        want = merged(input_ids=ids, attention_mask=mask, position_ids=dec.positions(mask, 9)).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(sess, ids, mask, max_new_tokens=8), neat_fx.generate(nm, ids, mask, max_new_tokens=8))


def test_logits_and_attention_options_are_for_the_with_past_task(tmp_path):
    model = decoders.build("llama")
    for kw in (dict(logits="all"), dict(attention="model")):
        with pytest.raises(neat_fx.ConfigError, match="with-past decoder file"):
            to_onnx(model, decoders.example_inputs(), tmp_path / "x.onnx", **kw)
    with pytest.raises(neat_fx.ConfigError, match="logits must be one of"):
        to_onnx(model, decoders.example_inputs(), tmp_path / "x.onnx", task=TASK, logits="first")
    assert list(tmp_path.iterdir()) == []
