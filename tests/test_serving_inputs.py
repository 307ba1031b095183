"""A mixed batch (`adapter_names=`) refuses bad inputs exactly as a plain call does: InputMismatchError naming the
input and the dimension, not torch.export's raw guard or a ConfigError."""

from __future__ import annotations

import pytest
import torch

import neat_fx

from helpers import three_bert_adapters


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, example, other, _ = three_bert_adapters(root)
    return neat_fx.serve(model, {n: root / n for n in "abc"}, example).eval(), other


def test_mixed_batch_input_errors_are_a_plain_calls(bank):
    bank, other = bank
    batch = other["input_ids"].shape[0]
    names = (["a", "b", "c"] * batch)[:batch]
    longer = dict(other, attention_mask=torch.ones(batch, other["input_ids"].shape[1] + 1, dtype=torch.long))
    for call in (lambda: bank(**longer), lambda: bank(**longer, adapter_names=names)):
        with pytest.raises(neat_fx.InputMismatchError, match="attention_mask"):
            call()
    for call in (lambda: bank(**other, nope=1), lambda: bank(**other, nope=1, adapter_names=names)):
        with pytest.raises(neat_fx.InputMismatchError, match="cannot take this call"):
            call()
    with torch.no_grad():  # and a good mixed call still runs
        assert bank(**other, adapter_names=names).logits.shape[0] == batch
