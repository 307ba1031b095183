"""A model built on the meta device (no storage) is transformed, then its weights are loaded and it trains: the
way a model bigger than one machine's memory is set up. Compared with transforming the real model."""

from __future__ import annotations

import warnings

import pytest
import torch

import neat_fx

from helpers import max_diff


def _config():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
        initializer_range=0.2,
    )


def _inputs():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _on_meta():
    import transformers

    with torch.device("meta"):
        return transformers.LlamaForCausalLM(_config())


def test_transform_on_meta_then_load_equals_transform_of_the_real_model():
    import transformers

    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(_config())
    ex = _inputs()
    model = _on_meta()
    nm = neat_fx.transform(model, "all-linear", ex, seed=3)
    assert all(p.is_meta for p in nm.parameters())  # nothing allocated, adapters included
    assert len(nm.sites()) == 14 and neat_fx.blocks(nm) == ["model.layers.0", "model.layers.1"]
    with pytest.raises(neat_fx.ConfigError, match="weights on the meta device .* to_empty"):
        nm(**ex)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nm.to_empty(device="cpu")
    assert any("model.rotary_emb.inv_freq" in str(w.message) for w in caught)  # the buffers no state dict holds
    model.load_state_dict(real.state_dict())
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # what the warning says to do

    ref = neat_fx.transform(real, "all-linear", ex, seed=3)
    mine, theirs = nm.adapters.state_dict(), ref.adapters.state_dict()
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in theirs) == 0.0  # the same initial adapters
    with torch.no_grad():
        for key, ad in ref.adapters.items():
            ad.B.normal_(0, 0.1)
            nm.adapters[key].B.copy_(ad.B)
    nm.eval(), ref.eval()
    assert max_diff(nm(**ex).logits, ref(**ex).logits) == 0.0
    # and it trains: one step on each, the same adapters after
    for m in (nm, ref):
        m.train()
        opt = torch.optim.SGD(m.adapters.parameters(), lr=0.1)
        m(**ex).logits.float().pow(2).mean().backward()
        opt.step()
    mine, theirs = nm.adapters.state_dict(), ref.adapters.state_dict()
    assert max(float((mine[k] - theirs[k]).abs().max()) for k in theirs) < 1e-6


def test_meta_refusals_name_the_problem():
    ex = _inputs()
    with pytest.raises(neat_fx.ConfigError, match=r"trainable=\['lm_head\*'\] on a meta-device model"):
        neat_fx.transform(_on_meta(), "*q_proj", ex, trainable=["lm_head*"])
    half = _on_meta()
    half.lm_head.to_empty(device="cpu")
    with pytest.raises(neat_fx.ConfigError, match=r"partly on the meta device .* partly not \(e.g. lm_head.weight\)"):
        neat_fx.transform(half, "*q_proj", ex)
