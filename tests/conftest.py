"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from helpers import three_bert_adapters


@pytest.fixture(scope="session")
def bert_adapters(tmp_path_factory):
    """Three adapters of one BERT that differ in everything a multi-adapter server must absorb (sites, rank, depth,
    activation, a head trained in full, PEFT's PEANuT format), made once for test_serving.py and
    test_serving_onnx.py, which only read them. Returns (model, example, other, {name: NeatModule}, folder)."""
    root = tmp_path_factory.mktemp("adapters")
    model, example, other, modules = three_bert_adapters(root)
    return model, example, other, modules, root
