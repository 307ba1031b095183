"""Output heads tied to the input embedding (GPT-2, Gemma-2, T5, BART, Whisper): `"*"` adapts the head,
`merge_into` unties it (the embedding keeps W0) and records it in the Hugging Face tying metadata, so
`save_pretrained` → `from_pretrained` reloads the function nm computes; `fold` agrees. `"all-linear"`
selects what PEFT's `target_modules="all-linear"` selects."""

from __future__ import annotations

import copy

import pytest
import torch

import neat_fx
from neat_fx.numerics import flat_tensors

import decoders
import zoo
from helpers import max_diff, randomize_adapters


def _seq2seq(name):
    import transformers as T

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 90, (2, 7), generator=g)
    dec = torch.randint(3, 90, (2, 5), generator=g)
    small = dict(
        vocab_size=96,
        d_model=32,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    layers = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    ffn = dict(encoder_ffn_dim=64, decoder_ffn_dim=64)
    if name == "t5":
        cfg = T.T5Config(**small, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        return T.T5ForConditionalGeneration(cfg).eval(), dict(input_ids=ids, decoder_input_ids=dec), "lm_head.weight"
    if name == "bart":
        model = T.BartForConditionalGeneration(T.BartConfig(**small, **layers, **ffn, max_position_embeddings=32))
        return model.eval(), dict(input_ids=ids, decoder_input_ids=dec), "lm_head.weight"
    cfg = T.WhisperConfig(
        **small, **layers, **ffn, num_mel_bins=8, max_source_positions=8, max_target_positions=32
    )  # the encoder halves 16 frames to its 8 positions
    model = T.WhisperForConditionalGeneration(cfg).eval()
    features = torch.randn(2, 8, 16, generator=g)
    return model, dict(input_features=features, decoder_input_ids=dec), "proj_out.weight"


def _case(name):
    if name in ("gpt2", "gemma2"):
        model = decoders.build(name)
        return model, decoders.example_inputs(), "lm_head.weight"
    return _seq2seq(name)


@pytest.mark.parametrize("name", ["gpt2", "gemma2", "t5", "bart", "whisper"])
def test_merge_unties_the_head_and_save_pretrained_reloads_it(name, tmp_path):
    model, example, head = _case(name)
    nm = neat_fx.transform(model, ["*"], example, rank=4, modes=("eval",), seed=0)
    tied = [s for s in nm.sites() if s.shared_with_other_ops]
    assert len(tied) == 1 and tied[0].linear_paths == (head,)  # the head, not the embedding, is adapted
    assert f"{head} [tied to" in nm.summary()
    randomize_adapters(nm, std=0.3, seed=3)
    embedding = model.get_input_embeddings().weight
    w0 = embedding.detach().clone()
    with torch.no_grad():
        want = nm(**example)
        folded = neat_fx.fold(nm)(**example)
        merged = neat_fx.merge_into(copy.deepcopy(model), nm)
        got = merged(**example)
    assert max_diff(folded, want) <= 1e-4 * max(t.abs().max().item() for t in flat_tensors(want))
    assert max_diff(got, folded) <= 1e-5 * max(t.abs().max().item() for t in flat_tensors(want))  # same weights
    assert merged.get_parameter(head) is not merged.get_input_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, w0)  # the embedding keeps W0
    assert torch.equal(embedding, w0) and model.get_parameter(head) is embedding  # the original is untouched

    merged.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.get_parameter(head) is not reloaded.get_input_embeddings().weight
    with torch.no_grad():
        again = reloaded(**example)
    assert max_diff(again, got) == 0.0
    if name == "bart":  # its encoder and decoder embeddings stay tied to `shared`
        assert reloaded.model.encoder.embed_tokens.weight is reloaded.model.shared.weight


def test_merge_into_the_shared_model_twice_keeps_nm_and_other_modules_right():
    model = decoders.build("gemma2")
    example = decoders.example_inputs()
    nm = neat_fx.transform(model, ["*"], example, rank=4, modes=("eval",), seed=0)
    other = neat_fx.transform(model, ["*"], example, rank=4, modes=("eval",), seed=1)
    randomize_adapters(nm, std=0.3, seed=3)
    randomize_adapters(other, std=0.3, seed=4)
    with torch.no_grad():
        want, want_other = nm(**example), other(**example)
        neat_fx.merge_into(model, nm)
        assert model.config.tie_word_embeddings is False
        assert max_diff(nm(**example), want) == 0.0  # nm reads W0 for the embedding and the head
        assert max_diff(other(**example), want_other) == 0.0  # another module built on the same model too
        assert max_diff(model(**example), want) <= 1e-4 * want.logits.abs().max().item()
        neat_fx.merge_into(model, nm)  # idempotent: ΔW from W0, written into the untied head again
        assert max_diff(model(**example), want) <= 1e-4 * want.logits.abs().max().item()


def test_untie_needs_separate_attributes():
    """A weight read as a linear weight and as an embedding through one attribute cannot be untied in place."""

    class OneAttribute(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(20, 8))

        def forward(self, ids):
            return torch.nn.functional.embedding(ids, self.table) @ self.table.t()

    model = OneAttribute()
    ids = torch.randint(0, 20, (2, 5))
    nm = neat_fx.transform(model, ["table"], (ids,), rank=2)
    randomize_adapters(nm)
    before = model.table.detach().clone()
    with pytest.raises(neat_fx.MergeError, match="same attribute"):
        neat_fx.merge_into(model, nm)
    assert torch.equal(model.table, before)
    with torch.no_grad():
        assert max_diff(neat_fx.fold(nm)(ids), nm(ids)) <= 1e-5  # fold still unties in its graph


def _peft_all_linear(model, task_type=None) -> set[str]:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg = LoraConfig(target_modules="all-linear", task_type=task_type)
    return set(_maybe_include_all_linear_layers(cfg, model).target_modules)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "bert"])
def test_all_linear_selects_what_peft_selects(name):
    if name == "bert":
        model, example, _, _ = zoo.bert()
        want = _peft_all_linear(model, "SEQ_CLS")
    else:
        model = decoders.build(name)
        example = decoders.example_inputs()
        want = _peft_all_linear(model)
    nm = neat_fx.transform(model, "all-linear", example, rank=2, modes=("eval",))
    got = {s.name.removesuffix(".weight") for s in nm.sites()}
    assert got == want
    assert not any(s.shared_with_other_ops for s in nm.sites())  # the tied head is left out


def test_all_linear_on_a_plain_module_is_every_linear_weight():
    model, example, _, _ = zoo.home_grown()
    every = {s.name for s in neat_fx.transform(model, ["*"], example, rank=2, modes=("eval",)).sites()}
    nm = neat_fx.transform(model, ["ALL-LINEAR"], example, rank=2, modes=("eval",))
    assert {s.name for s in nm.sites()} == every


def test_tied_head_saved_for_peft_under_the_head_name(tmp_path):
    """PEFT knows the adapted head by its nn.Linear (lm_head), not by the embedding it is tied to."""
    import json

    from peft import PeftModel

    model = decoders.build("gpt2")
    example = decoders.example_inputs()
    nm = neat_fx.transform(model, ["lm_head"], example, rank=4, modes=("eval",))
    randomize_adapters(nm, std=0.2)
    neat_fx.save_adapters(nm, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["lm_head"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    again = neat_fx.load_adapters(model, tmp_path, example)
    with torch.no_grad():
        want = nm(**example).logits
        assert max_diff(peft_model(**example).logits, want) <= 1e-5 * want.abs().max().item()
        assert max_diff(again(**example).logits, want) == 0.0
