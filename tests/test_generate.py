"""neat_fx.generate: greedy tokens identical to merge_into + Hugging Face generate on six decoder families,
from nm and from fold(nm); the KV cache in use (one token per decode step); adapters live after training;
the user's model untouched; bad input refused before anything runs."""

from __future__ import annotations

import copy

import pytest
import torch

import neat_fx

import decoders
import zoo
from helpers import randomize_adapters

NEW = 32


def _hf_generate(model, ids, mask, **kw):
    eos = model.generation_config.eos_token_id
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None else eos,
        **kw,
    )


def _transformed(name: str, modes=("eval",), patterns=("*",)):
    model = decoders.build(name)
    nm = neat_fx.transform(model, list(patterns), decoders.example_inputs(), rank=4, modes=modes, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    return model, nm


def _until_eos(tokens: torch.Tensor, start: int, eos: int) -> list[torch.Tensor]:
    """Each row's new tokens up to and including its first EOS."""
    rows = []
    for row in tokens[:, start:]:
        hit = (row == eos).nonzero()
        rows.append(row[: int(hit[0]) + 1] if len(hit) else row)
    return rows


# Qwen2 is LLaMA with biased q/k/v projections, nothing generate treats differently: slow, to keep the default run
# near its budget (`pytest -m slow` runs it).
SLOW_FAMILIES = ("qwen2",)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in decoders.DECODERS]
)
def test_greedy_tokens_equal_merged_model_generate(name):
    model, nm = _transformed(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = decoders.left_padded()
    ours = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    assert ours.shape[0] == 2 and ours.shape[1] <= ids.shape[1] + NEW
    assert torch.equal(ours[:, : ids.shape[1]], ids)  # the prompt, then the new tokens, like HF generate

    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    assert torch.equal(ours, _hf_generate(merged, ids, mask))
    assert torch.equal(neat_fx.generate(neat_fx.fold(nm), ids, mask, max_new_tokens=NEW), ours)
    assert not torch.equal(ours, _hf_generate(model, ids, mask))  # the adapters change the text

    # the user's model: same parameter objects, same values, still tied where it was
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)

    # the tokens are the transformed graph's own greedy choices: teacher-force them through nm (no cache)
    eos = model.generation_config.eos_token_id
    full_mask = torch.cat([mask, (ours[:, ids.shape[1] :] != -1).long()], 1)
    for row, new in enumerate(_until_eos(ours, ids.shape[1], eos)):
        seq = ours[row : row + 1, : ids.shape[1] + len(new)]
        m = full_mask[row : row + 1, : seq.shape[1]]
        both = dict(
            input_ids=seq.repeat(2, 1),
            attention_mask=m.repeat(2, 1),
            position_ids=(m.cumsum(-1) - 1).clamp(min=0).repeat(2, 1),
        )
        with torch.no_grad():
            logits = nm(**both).logits[0, ids.shape[1] - 1 : -1]
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # positions where the choice is not a float tie
        assert clear.float().mean() > 0.9
        assert torch.equal(logits.argmax(-1)[clear], new[clear])


def test_decode_steps_feed_one_token_through_the_cache():
    """The cost of a new token does not grow with the prefix beyond attention's: after the prefill every
    forward call sees one token per row and a cache holding the whole prefix."""
    model, nm = _transformed("llama")
    seen = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it
        seen.append((tuple(kwargs["input_ids"].shape), cache.get_seq_length() if cache is not None else 0))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        ids, mask = decoders.left_padded()
        out = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=[])
    finally:
        handle.remove()
    width = ids.shape[1]
    assert out.shape == (2, width + NEW)
    assert seen[0] == ((2, width), 0)  # prefill
    assert seen[1:] == [((2, 1), width + i) for i in range(NEW - 1)]


def test_adapters_stay_live_across_training_steps():
    model, nm = _transformed("llama", modes=("train", "eval"))
    ids, mask = decoders.left_padded()
    nm.train()
    first = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    assert nm.training and model.training  # generation ran in eval mode and gave the mode back
    assert torch.equal(neat_fx.generate(nm, ids, mask, max_new_tokens=NEW), first)  # deterministic: no dropout

    opt = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=5.0)
    batch = decoders.example_inputs()
    loss = -nm(**batch).logits.log_softmax(-1)[..., 7].mean()  # push every position towards token 7
    loss.backward()
    opt.step()
    second = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    assert not torch.equal(second, first)  # no stale folded weights
    assert torch.equal(second, _hf_generate(neat_fx.merge_into(copy.deepcopy(model), nm), ids, mask))


def test_sampling_follows_hf_with_the_same_seed():
    model, nm = _transformed("qwen2")
    ids, mask = decoders.left_padded()
    torch.manual_seed(7)
    ours = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, do_sample=True, temperature=0.7, top_p=0.9)
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    torch.manual_seed(7)
    theirs = merged.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=0.7, top_p=0.9, top_k=0
    )
    assert torch.equal(ours, theirs)


def test_generate_after_merge_into_the_shared_model():
    """After merge_into(model, nm) — the model nm shares, head tied to the embedding — both generate the same."""
    model, nm = _transformed("gpt2")
    ids, mask = decoders.left_padded()
    ours = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    neat_fx.merge_into(model, nm)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(neat_fx.generate(nm, ids, mask, max_new_tokens=NEW), ours)
    assert torch.equal(_hf_generate(model, ids, mask), ours)


# -- bad input: a clear error, nothing changed ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_nm():
    return _transformed("gpt2")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=0), "max_new_tokens must be a positive"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=-3), "max_new_tokens must be a positive"),
        (
            lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=2.5),
            "max_new_tokens must be a positive",
        ),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids[0], max_new_tokens=4), "2-D integer tensor"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids.float(), max_new_tokens=4), "2-D integer tensor"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask[:, 1:], max_new_tokens=4), "must match"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask * 2, max_new_tokens=4), "only 0"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask.flip(-1), max_new_tokens=4), "padding on the left"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask * 0, max_new_tokens=4), "has no token"),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=60), "position table holds \\(64\\)"),
        (
            lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=4, do_sample=True, temperature=0),
            "temperature",
        ),
        (lambda nm, ids, mask: neat_fx.generate(nm, ids, mask, max_new_tokens=4, do_sample=True, top_p=1.5), "top_p"),
        (lambda nm, ids, mask: neat_fx.generate(nm.model, ids, mask, max_new_tokens=4), "expects a NeatModule"),
    ],
)
def test_bad_generation_input_is_refused(gpt2_nm, call, message):
    model, nm = gpt2_nm
    before = {n: p.detach().clone() for n, p in nm.state_dict().items()}
    ids, mask = decoders.left_padded()
    with pytest.raises(neat_fx.GenerationError, match=message):
        call(nm, ids, mask)
    after = nm.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_generate_on_an_encoder_is_refused():
    model, example, _, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=2, modes=("eval",))
    with pytest.raises(neat_fx.GenerationError, match="cannot generate text"):
        neat_fx.generate(nm, example["input_ids"], max_new_tokens=4)


def test_decoder_captured_with_a_cache_is_refused_clearly():
    model = decoders.build("llama")
    example = dict(decoders.example_inputs(), use_cache=True)
    with pytest.raises(neat_fx.CaptureError, match="use_cache=False"):
        neat_fx.transform(model, ["*q_proj"], example, modes=("eval",))
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


def test_adapters_of_another_decoder_are_refused(tmp_path):
    _, nm = _transformed("llama", patterns=("*q_proj", "*v_proj"))
    neat_fx.save_adapters(nm, tmp_path / "a")
    other = decoders.build("llama", seed=1)  # same shapes, other weights
    state = {n: p.detach().clone() for n, p in other.state_dict().items()}
    with pytest.raises(neat_fx.AdapterMismatchError):
        neat_fx.load_adapters(other, tmp_path / "a", decoders.example_inputs())
    assert all(torch.equal(other.state_dict()[n], state[n]) for n in state)


def test_bf16_base_with_a_parameter_trained_in_full():
    """The trained-in-full copy (float32 master of a bf16 parameter) is used, cast like the graph casts it."""
    model = decoders.build("llama").to(torch.bfloat16)
    nm = neat_fx.transform(
        model, ["*q_proj", "*v_proj"], decoders.example_inputs(), rank=4, modes=("eval",), trainable=["model.norm"]
    )
    randomize_adapters(nm, std=0.3, seed=5)
    with torch.no_grad():
        nm.trainable[next(iter(nm.trainable_names))].mul_(torch.linspace(0.5, 1.5, 32))
    ids, mask = decoders.left_padded()
    ours = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    assert torch.equal(ours, _hf_generate(neat_fx.merge_into(copy.deepcopy(model), nm), ids, mask))
    assert model.model.norm.weight.dtype == torch.bfloat16 and torch.equal(
        model.model.norm.weight, decoders.build("llama").to(torch.bfloat16).model.norm.weight
    )


def test_a_weight_tied_through_one_attribute_cannot_generate():
    """Embedding and head read one attribute: the model's own code cannot give only the head W0 + ΔW."""
    model = decoders.build("gpt2")
    nm = neat_fx.transform(model, ["lm_head"], decoders.example_inputs(), rank=2, modes=("eval",))
    site = nm.sites()[0]
    # what a model reading one attribute both ways looks like to generate (the capture cannot separate them)
    nm.site_infos[0] = type(site)(**{**site.__dict__, "linear_paths": ()})
    ids, mask = decoders.left_padded()
    with pytest.raises(neat_fx.GenerationError, match="exclude="):
        neat_fx.generate(nm, ids, mask, max_new_tokens=4)
    with pytest.raises(neat_fx.GenerationError, match="exclude="):
        neat_fx.generate(neat_fx.fold(nm), ids, mask, max_new_tokens=4)


def test_folded_weights_are_kept_until_an_adapter_changes(monkeypatch):
    import sys

    gen = sys.modules["neat_fx.generate"]  # the module (neat_fx.generate is the function)
    model, nm = _transformed("llama", modes=("train", "eval"))
    ids, mask = decoders.left_padded()
    folds = []
    real = gen.adapted_weights
    monkeypatch.setattr(gen, "adapted_weights", lambda m: folds.append(1) or real(m))
    first = neat_fx.generate(nm, ids, mask, max_new_tokens=4)
    assert torch.equal(neat_fx.generate(nm, ids, mask, max_new_tokens=4), first) and len(folds) == 1  # kept
    with torch.no_grad():
        next(iter(nm.adapters.values())).B.add_(1.0)  # an in-place change moves the version counter
    changed = neat_fx.generate(nm, ids, mask, max_new_tokens=4)
    assert len(folds) == 2 and not torch.equal(changed, first)
    assert torch.equal(changed, _hf_generate(neat_fx.merge_into(copy.deepcopy(model), nm), ids, mask)[:, :13])
    neat_fx.generate(nm, ids, mask, max_new_tokens=4, keep_folded=False)
    assert len(folds) == 3 and "_generation_cache" not in nm.__dict__


def test_generation_runs_without_dropout_on_a_model_left_in_train_mode():
    """A decoder with heavy dropout, left in train mode: generate must run in eval mode (the view's own flags), so
    its tokens equal the merged model's eval-mode generate and repeat exactly — and the model stays in train mode."""
    model = decoders.build("gpt2")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    model.train()
    nm = neat_fx.transform(model, ["*"], decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    nm.train()
    ids, mask = decoders.left_padded()
    got = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    assert model.training and nm.training
    merged = neat_fx.merge_into(copy.deepcopy(model), nm).eval()
    assert torch.equal(got, _hf_generate(merged, ids, mask))
    assert torch.equal(neat_fx.generate(nm, ids, mask, max_new_tokens=NEW), got)
    with torch.no_grad():  # the dropout is real: two train-mode forwards differ
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
