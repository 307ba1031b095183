"""The ONNX export's verification compares ONNX Runtime's outputs with PyTorch's: a file whose outputs are off by a
little more than the tolerance (ONNX Runtime's session wrapped to perturb its first output by 0.2 %: a subtle
export bug) is refused, nothing written. A verification that compared PyTorch with itself, or ignored one of the
two, fails these tests (tests/mutants: verification_compares_model_with_itself)."""

from __future__ import annotations

import pytest
import torch

import neat_fx

pytest.importorskip("onnxruntime")

from neat_fx.export import ExportError, runtime, to_onnx  # noqa: E402

import decoders  # noqa: E402
import zoo  # noqa: E402
from helpers import randomize_adapters  # noqa: E402

#: the relative error injected into the first output: 20× the fp32 tolerance (1e-4 of each output's scale)
OFF = 2e-3


class _Off:
    """An InferenceSession whose first output comes back multiplied by 1 + OFF."""

    def __init__(self, sess):
        self._sess = sess

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def run(self, names, feed, *args, **kwargs):
        out = self._sess.run(names, feed, *args, **kwargs)
        return [out[0] * (1 + OFF), *out[1:]]


@pytest.fixture
def off_by_a_little(monkeypatch):
    real = runtime.session
    monkeypatch.setattr(runtime, "session", lambda *a, **k: _Off(real(*a, **k)))


def test_plain_export_refuses_a_file_slightly_off(tmp_path, off_by_a_little):
    model, example, _, _ = zoo.home_grown()
    with pytest.raises(ExportError, match=r"ONNX Runtime \(cpu\) and PyTorch disagree .* Nothing was written"):
        to_onnx(model.eval(), example, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_with_past_export_refuses_a_file_slightly_off(tmp_path, off_by_a_little):
    model = decoders.build("llama")
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    with pytest.raises(ExportError, match=r"disagree on the prefill logits"):
        to_onnx(neat_fx.fold(nm), decoders.example_inputs(), tmp_path / "lm.onnx", task="text-generation-with-past")
    assert list(tmp_path.iterdir()) == []


def test_the_same_exports_pass_unperturbed(tmp_path):
    """The control: without the perturbation both exports verify (so the refusals above are the perturbation's)."""
    model, example, _, _ = zoo.home_grown()
    assert to_onnx(model.eval(), example, tmp_path / "m.onnx").max_rel_diff <= 1e-4
    model = decoders.build("llama")
    with torch.no_grad():
        report = to_onnx(model, decoders.example_inputs(), tmp_path / "lm.onnx", task="text-generation-with-past")
    assert report.max_rel_diff <= 1e-4
