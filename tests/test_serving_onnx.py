"""to_onnx(base, example, path, adapters=...): one ONNX model, one ONNX Runtime adapter file per adapter.
Structure (inputs with defaults, adapter files, counted), numbers (each adapter through ONNX Runtime's LoRA
mechanism = its own NeatModule; the bare model = the base model), and bad input (another base, unknown names,
options, a failed verification leaves no file)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neat_fx
from neat_fx.names import module_name

import zoo
from helpers import randomize_adapters

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from neat_fx.export import AdapterSession, ExportError, multi, runtime, to_onnx  # noqa: E402

TOL = 1e-4


def rel(want: torch.Tensor, got: np.ndarray) -> float:
    w = want.detach().float().numpy()
    return float(np.abs(w - got).max()) / max(1e-12, float(np.abs(w).max()))


@pytest.fixture(scope="module")
def exported(bert_adapters, tmp_path_factory):
    """Three adapters of one BERT that differ in sites, rank, depth and activation, one with a head trained in
    full and one saved in PEFT's PEANuT format (conftest.py, shared with test_serving.py), exported as one model."""
    model, example, other, modules, root = bert_adapters
    out = tmp_path_factory.mktemp("onnx")
    report = to_onnx(model, example, out / "model.onnx", adapters=[root / "a", root / "b", root / "c"])
    return model, example, other, modules, root, out, report


def test_files_inputs_and_defaults(exported):
    model, _, _, modules, _, out, report = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "model.a.onnx_adapter",
        "model.b.onnx_adapter",
        "model.c.onnx_adapter",
        "model.onnx",
    ]
    assert report.adapters == {n: out / f"model.{n}.onnx_adapter" for n in "abc"}
    assert report.input_names == ["input_ids", "attention_mask"]

    sites = {s.name: s for m in modules.values() for s in m.sites()}  # the union: 26 sites of 2 layers + pooler
    trained = {"classifier.weight", "classifier.bias"}
    want = {f"neat.{module_name(n)}.{part}" for n in sites for part in ("h", "sb")} | {f"neat.{n}" for n in trained}
    assert len(want) == 2 * len(sites) + 2 and set(report.adapter_inputs) == want

    proto = onnx.load(str(report.path))
    inputs = [i.name for i in proto.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"] and set(inputs[2:]) == want and len(inputs) == len(want) + 2
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in want}
    assert set(defaults) == want  # every adapter input has an initializer: the file alone is the base model
    params = dict(model.named_parameters())
    for name, site in sites.items():
        rank = max(m.adapters[site.key].A.shape[1] for m in modules.values() if site.key in m.adapters)
        w = params[name]
        h, sb = defaults[f"neat.{module_name(name)}.h"], defaults[f"neat.{module_name(name)}.sb"]
        assert h.shape == (w.shape[1], rank) and sb.shape == (w.shape[0], rank)  # padded to the largest rank
        assert not h.any() and not sb.any()
    for name in trained:
        assert np.array_equal(defaults[f"neat.{name}"], params[name].detach().numpy())  # the base value

    # each adapter file holds that adapter's sites and trained parameters, nothing else
    for n, nm in modules.items():
        got = ort.AdapterFormat.read_adapter(str(report.adapters[n])).get_parameters()
        mine = {f"neat.{module_name(s.name)}.{part}" for s in nm.sites() for part in ("h", "sb")}
        mine |= {f"neat.{t}" for t in nm.trainable_names.values()}
        assert set(got) == mine
        for s in nm.sites():
            shape = tuple(got[f"neat.{module_name(s.name)}.h"].shape())
            assert shape == tuple(defaults[f"neat.{module_name(s.name)}.h"].shape)
    assert {"neat.classifier.weight"} <= set(ort.AdapterFormat.read_adapter(str(report.adapters["a"])).get_parameters())


def test_each_adapter_equals_its_own_module(exported):
    model, _, other, modules, _, _, report = exported
    # the export's own check: bare + 3 adapters on two input shapes
    assert [p["adapter"] for p in report.parity] == [None, "a", "b", "c"] * 2
    assert len({tuple(map(tuple, p["shapes"])) for p in report.parity}) == 2 and report.max_rel_diff <= TOL
    # independently, on a third shape, against each adapter's own NeatModule and the base model
    runner = AdapterSession(report.path, "cpu")
    assert runner.adapter_names == ["a", "b", "c"]
    feed = {k: v.numpy() for k, v in other.items()}
    with torch.no_grad():
        for name, nm in modules.items():
            assert rel(nm(**other).logits, runner.run(None, feed, adapter=name)[0]) <= TOL
        base = model(**other).logits
    assert rel(base, runner.run(None, feed)[0]) <= TOL
    assert rel(base, runner.session.run(None, feed)[0]) <= TOL  # plain ONNX Runtime, no adapter
    # ONNX Runtime directly: an adapter file + RunOptions
    adapter = ort.LoraAdapter()
    adapter.Load(str(report.adapters["b"]))
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    with torch.no_grad():
        assert rel(modules["b"](**other).logits, runner.session.run(None, feed, ro)[0]) <= TOL
    # switching back and forth gives the same numbers
    first = runner.run(None, feed, adapter="a")[0]
    runner.run(None, feed, adapter="c")
    assert np.array_equal(first, runner.run(None, feed, adapter="a")[0])


def test_unknown_adapter_and_missing_files(exported, tmp_path):
    *_, report = exported
    runner = AdapterSession(report.path, "cpu")
    with pytest.raises(neat_fx.ConfigError, match="no adapter named 'z'.*'a', 'b', 'c'"):
        runner.run(None, {}, adapter="z")
    copy = tmp_path / "model.onnx"
    copy.write_bytes(report.path.read_bytes())  # the model without its adapter files
    with pytest.raises(FileNotFoundError, match="'a'.*model.a.onnx_adapter"):
        AdapterSession(copy, "cpu")


def test_adapters_of_another_base_are_refused(exported, tmp_path):
    _, example, _, _, root, _, _ = exported
    other_model, _, _, _ = zoo.bert()
    with torch.no_grad():
        other_model.bert.encoder.layer[1].attention.self.query.weight.mul_(1.5)
    with pytest.raises(neat_fx.AdapterMismatchError, match="'a': site bert.encoder.layer.1.attention.self.query"):
        to_onnx(other_model.eval(), example, tmp_path / "m.onnx", adapters={"a": root / "a", "b": root / "b"})
    llama, lex, _, _ = zoo.llama()
    with pytest.raises(neat_fx.AdapterMismatchError, match="'b'.*not a parameter of the model"):
        to_onnx(llama, lex, tmp_path / "m.onnx", adapters={"b": root / "b"})
    assert list(tmp_path.iterdir()) == []


def test_bad_options(exported, tmp_path):
    model, example, _, modules, root, _, _ = exported
    folders = [root / "a", root / "b"]
    with pytest.raises(neat_fx.ConfigError, match="fp32"):
        to_onnx(model, example, tmp_path / "m.onnx", adapters=folders, dtype="fp16")
    with pytest.raises(neat_fx.ConfigError, match="list.*dict"):
        to_onnx(model, example, tmp_path / "m.onnx", adapters=str(root / "a"))
    with pytest.raises(neat_fx.ConfigError, match="untouched base model"):
        to_onnx(modules["a"], example, tmp_path / "m.onnx", adapters=folders)
    with pytest.raises(neat_fx.ConfigError, match="cannot name a file"):
        to_onnx(model, example, tmp_path / "m.onnx", adapters={"x/y": root / "a"})
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.ModelProto(), str(plain))  # a file without our metadata
    with pytest.raises(neat_fx.ConfigError, match="records no adapters"):
        AdapterSession(plain, "cpu")
    plain.unlink()
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_writes_nothing(exported, tmp_path, monkeypatch):
    model, example, _, _, root, _, _ = exported
    write = multi._write_adapter

    def wrong(path, inputs, name, model_fingerprint):  # adapter 'b' written with twice its values
        if name == "b":
            inputs = [dataclasses.replace(i, values={k: 2 * v for k, v in i.values.items()}) for i in inputs]
        write(path, inputs, name, model_fingerprint)

    monkeypatch.setattr(multi, "_write_adapter", wrong)
    (tmp_path / "m.onnx").write_bytes(b"previous")
    with pytest.raises(ExportError, match="adapter 'b' active and PyTorch disagree.*Nothing was written"):
        to_onnx(model, example, tmp_path / "m.onnx", adapters={"a": root / "a", "b": root / "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporaries, old file kept
    assert (tmp_path / "m.onnx").read_bytes() == b"previous"


@pytest.mark.slow
@pytest.mark.parametrize("optimize", ["fusions", "none"])
def test_other_optimisation_levels_keep_the_inputs_overridable(exported, tmp_path, optimize):
    model, example, other, modules, root, _, _ = exported
    report = to_onnx(model, example, tmp_path / "m.onnx", adapters=[root / "a", root / "b"], optimize=optimize)
    assert report.max_rel_diff <= TOL and len(report.parity) == 6
    runner = AdapterSession(report.path, "cpu")
    feed = {k: v.numpy() for k, v in other.items()}
    with torch.no_grad():
        for name in ("a", "b"):
            assert rel(modules[name](**other).logits, runner.run(None, feed, adapter=name)[0]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["projections", "tied", "llama", "home_grown", "gpt2"])
def test_other_models_and_forms(name, tmp_path):
    """Left-form and transposed weights (projections), a weight used twice (tied), decoders, Conv1D (gpt2): two
    adapters of different ranks and sites each, every one equal to its own module through ONNX Runtime."""
    model, example, other, patterns = zoo.ZOO[name]()
    model.eval()
    modules = {}
    for i, n in enumerate("xy"):
        nm = neat_fx.transform(model, patterns if i == 0 else patterns[:1], example, rank=2 + i, modes=("eval",))
        randomize_adapters(nm, std=0.2, seed=i)
        neat_fx.save_adapters(nm, tmp_path / n)
        modules[n] = nm.eval()
    report = to_onnx(model, example, tmp_path / "m.onnx", adapters={n: tmp_path / n for n in modules})
    assert report.max_rel_diff <= TOL
    runner = AdapterSession(report.path, "cpu")
    leaves = [t for t in torch.utils._pytree.tree_leaves(other) if isinstance(t, torch.Tensor)]
    feed = {i.name: t.numpy() for i, t in zip(runner.get_inputs(), leaves)}
    with torch.no_grad():
        for n, nm in modules.items():
            want = torch.utils._pytree.tree_leaves(nm(*other) if isinstance(other, tuple) else nm(**other))[0]
            assert rel(want, runner.run(None, feed, adapter=n)[0]) <= TOL


@pytest.mark.slow
def test_cli_exports_several_adapters(exported, tmp_path):
    model, _, other, modules, root, _, _ = exported
    model.save_pretrained(tmp_path / "base")
    script = Path(sys.executable).with_name("neat-fx")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", "--model", str(tmp_path / "base"), "--adapters", str(root / "a"), str(root / "b")]
    r = subprocess.run(
        cmd + args + ["--out", str(out / "m.onnx"), "--seq-len", "12"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert "adapter 'b'" in r.stdout and sorted(p.name for p in out.iterdir()) == [
        "m.a.onnx_adapter",
        "m.b.onnx_adapter",
        "m.onnx",
    ]
    runner = AdapterSession(out / "m.onnx", "cpu")
    feed = {k: v.numpy() for k, v in other.items()}
    with torch.no_grad():
        for name in ("a", "b"):
            assert rel(modules[name](**other).logits, runner.run(None, feed, adapter=name)[0]) <= TOL


def _two_bases_one_folder(root: Path):
    """Two models that differ in one base weight, each with an adapter named 'sst2' of its own, exported as
    model1.onnx and model2.onnx into one folder. Returns (folder, {model stem: (base, example, other, NeatModule)})."""
    out = root / "models"
    out.mkdir()
    made = {}
    for i, stem in enumerate(("model1", "model2")):
        base, example, other, patterns = zoo.home_grown()
        base.eval()
        if i:
            with torch.no_grad():
                base.w_mid.mul_(1.5)
        nm = neat_fx.transform(base, patterns, example, rank=2, modes=("eval",))
        randomize_adapters(nm, std=0.2, seed=10 + i)
        neat_fx.save_adapters(nm, root / stem / "sst2")
        to_onnx(base, example, out / f"{stem}.onnx", adapters=[root / stem / "sst2"])
        made[stem] = base, example, other, nm.eval()
    return out, made


def test_two_models_with_adapters_of_one_name_share_a_folder(tmp_path):
    """Adapter files are named after their model too: the second export leaves the first model's adapter as it
    was (it used to overwrite `sst2.onnx_adapter`, and model1 then computed with model2's adapter). A file of the
    other model copied over one's own is refused by AdapterSession, and the export will not replace it."""
    out, made = _two_bases_one_folder(tmp_path)
    with torch.no_grad():
        want = {stem: nm(*other) for stem, (_, _, other, nm) in made.items()}
    assert rel(want["model1"], want["model2"].numpy()) > 100 * TOL  # the two adapters compute differently
    other = made["model1"][2]
    for stem in made:
        runner = AdapterSession(out / f"{stem}.onnx", "cpu")
        assert runner.adapter_names == ["sst2"]
        feed = {runner.get_inputs()[0].name: other[0].numpy()}
        assert rel(want[stem], runner.run(None, feed, adapter="sst2")[0]) <= TOL
    assert sorted(p.name for p in out.iterdir()) == [
        "model1.onnx",
        "model1.sst2.onnx_adapter",
        "model2.onnx",
        "model2.sst2.onnx_adapter",
    ]

    mine = (out / "model1.sst2.onnx_adapter").read_bytes()
    (out / "model1.sst2.onnx_adapter").write_bytes((out / "model2.sst2.onnx_adapter").read_bytes())
    with pytest.raises(
        neat_fx.AdapterMismatchError,
        match=r"model1.sst2.onnx_adapter is not the file of adapter 'sst2' of .*model1.onnx.*written for another "
        r"model.*copy the file to_onnx wrote beside model1.onnx",
    ):
        AdapterSession(out / "model1.onnx", "cpu")
    base, example, _, _ = made["model1"]
    with pytest.raises(neat_fx.ConfigError, match=r"model1.sst2.onnx_adapter exists .* belong to another model"):
        to_onnx(base, example, out / "model1.onnx", adapters=[tmp_path / "model1" / "sst2"])
    assert (out / "model1.sst2.onnx_adapter").read_bytes() == (out / "model2.sst2.onnx_adapter").read_bytes()
    (out / "model1.sst2.onnx_adapter").write_bytes(mine)  # its own file back: accepted, and replaced by an export
    to_onnx(base, example, out / "model1.onnx", adapters=[tmp_path / "model1" / "sst2"])
    runner = AdapterSession(out / "model1.onnx", "cpu")
    assert rel(want["model1"], runner.run(None, {runner.get_inputs()[0].name: other[0].numpy()}, "sst2")[0]) <= TOL
    assert len(list(out.iterdir())) == 4  # no temporaries left


def test_adapter_files_of_other_adapters_or_tools_are_refused(exported, tmp_path):
    """Each file records its model and adapter: a file of another adapter of the same model, a file without our
    tag and a file that is no adapter are refused, naming the file, the model and the fix."""
    *_, report = exported
    model = tmp_path / "model.onnx"
    model.write_bytes(report.path.read_bytes())
    for f in report.adapters.values():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    AdapterSession(model, "cpu")  # the copies are the model's own
    b = tmp_path / "model.b.onnx_adapter"
    b.write_bytes(report.adapters["a"].read_bytes())
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"model.b.onnx_adapter is not the file of adapter 'b'"):
        AdapterSession(model, "cpu")
    untagged = ort.AdapterFormat()
    untagged.set_adapter_version(1)
    untagged.set_parameters(ort.AdapterFormat.read_adapter(str(report.adapters["b"])).get_parameters())
    untagged.export_adapter(str(b))
    with pytest.raises(neat_fx.AdapterMismatchError, match="'b'.*records no model tag"):
        AdapterSession(model, "cpu")
    b.write_bytes(b"not an adapter")
    with pytest.raises(neat_fx.AdapterMismatchError, match="'b'.*not an ONNX Runtime adapter file.*export again"):
        AdapterSession(model, "cpu")


def test_models_exported_before_the_fingerprint_still_run(exported, tmp_path):
    """A model written the old way (files `<adapter>.onnx_adapter`, no fingerprint) runs, with a warning that its
    files cannot be checked and how to have them checked."""
    _, _, other, modules, _, _, report = exported
    proto = onnx.load(str(report.path))
    meta = {p.key: p.value for p in proto.metadata_props if p.key != runtime.META_MODEL_FINGERPRINT}
    meta[runtime.META_ADAPTERS] = json.dumps({n: f"{n}.onnx_adapter" for n in report.adapters})
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    for n, f in report.adapters.items():
        (tmp_path / f"{n}.onnx_adapter").write_bytes(f.read_bytes())
    with pytest.warns(UserWarning, match=r"older neat_fx: its adapter files \(a.onnx_adapter, b.onnx_adapter"):
        runner = AdapterSession(tmp_path / "model.onnx", "cpu")
    feed = {k: v.numpy() for k, v in other.items()}
    with torch.no_grad():
        assert rel(modules["c"](**other).logits, runner.run(None, feed, adapter="c")[0]) <= TOL


# The PyTorch bank's mixed batches (serving.py): in test_serving.py.
