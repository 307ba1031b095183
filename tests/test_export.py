"""neat_fx.export: folded models → optimised, verified ONNX; parity, fusions, fp16, dynamic axes,
atomic writes and bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neat_fx

import zoo
from helpers import call, randomize_adapters, tensors

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from neat_fx.export import (  # noqa: E402
    ExportConfig,
    ExportError,
    onnx_export,  # noqa: E402
    session,
    to_onnx,
)

ZOO_EXPORT = ["bert", "gpt2", "llama", "vit", "t5", "transformer_encoder", "home_grown", "projections", "cnn", "tied"]


def ort_outputs(path, inputs):
    sess = session(path, "cpu")
    leaves = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), leaves)})


def rel(ref, got):
    ref = [t.detach().float().numpy() for t in tensors(ref)]
    assert len(ref) == len(got)
    return max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got))


@pytest.mark.parametrize("name", ZOO_EXPORT)
def test_parity_for_every_zoo_model(name, tmp_path):
    model, example, other, patterns = zoo.ZOO[name]()
    model.eval()
    nm = neat_fx.transform(model, patterns, example, rank=4, modes=("eval",))
    randomize_adapters(nm, std=0.2)
    nm.eval()
    if name == "cnn":
        # image height/width are static by default (capture and export), the batch dynamic. With every axis
        # dynamic, torch.onnx lowers adaptive pooling for the example's height/width only: the verification on
        # another image size catches it.
        every = neat_fx.transform(model, patterns, example, rank=4, modes=("eval",), dynamic="all")
        all_axes = {"x": {i: torch.export.Dim.AUTO for i in range(4)}}
        with pytest.raises(ExportError, match="fails on inputs of shapes"):
            to_onnx(every, example, tmp_path / "m.onnx", dynamic=all_axes)
        assert list(tmp_path.iterdir()) == []
    report = to_onnx(nm, example, tmp_path / "m.onnx")
    assert report.folded_first and report.path.exists()
    assert len(report.parity) == 2 and report.max_rel_diff <= 1e-4
    assert report.parity[0]["shapes"] != report.parity[1]["shapes"]  # a second batch of another shape
    # independent check on a third shape: ONNX Runtime vs the unfolded NEAT module
    with torch.no_grad():
        want = call(nm, other)
    assert rel(want, ort_outputs(report.path, other)) <= 1e-4
    graph = onnx.load(str(report.path))
    assert not any("adapter" in i.name for i in graph.graph.initializer)


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    """The untouched zoo BERT exported once with the default options, for the tests that only read the file or
    the report. Returns (model, report)."""
    model, example, _, _ = zoo.bert()
    model.eval()
    return model, to_onnx(model, example, tmp_path_factory.mktemp("bert") / "auto.onnx")


def test_merged_model_route_and_dynamic_axes(tmp_path):
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    randomize_adapters(nm, std=0.2)
    neat_fx.merge_into(model, nm)
    model.eval()
    report = to_onnx(model, example, tmp_path / "merged.onnx")
    assert not report.folded_first and report.output_names == ["logits"]
    assert report.input_names == ["input_ids", "attention_mask"]
    dims = [
        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(str(report.path)).graph.input
    ]
    assert all(isinstance(d, str) and d for row in dims for d in row), f"all input axes dynamic: {dims}"
    for b, s in ((1, 5), (7, 30)):
        x = dict(input_ids=torch.randint(0, 120, (b, s)), attention_mask=torch.ones(b, s, dtype=torch.long))
        x["attention_mask"][0, s // 2 :] = 0
        with torch.no_grad():
            want = model(**x)
        assert rel(want, ort_outputs(report.path, x)) <= 1e-4


def test_optimisation_levels_and_fusion_counts(tmp_path, bert_onnx):
    model, example, other, patterns = zoo.bert()
    model.eval()
    _, auto = bert_onnx
    fusions = to_onnx(model, example, tmp_path / "fusions.onnx", optimize="fusions")
    plain = to_onnx(model, example, tmp_path / "plain.onnx", optimize="none")
    # auto: exact attention rewrite, GELU+bias fused, Add+LayerNorm left unfused on CPU, 1/√d folded into the
    # query weights (constant-folded: no scaled FusedMatMul, no Mul but the 2 zeroing rows without keys)
    assert auto.fused_ops.get("BiasGelu", 0) == 2 and auto.fused_ops.get("FusedMatMul", 0) == 0
    assert auto.op_counts["Mul"] == 2 and auto.op_counts["MatMul"] == 2 * (6 + 2)
    assert "SkipLayerNormalization" not in auto.fused_ops
    assert "IsNaN" not in auto.op_counts
    assert (
        onnx_export.CPU_DISABLED_OPTIMIZERS[0]
        in dict((p.key, p.value) for p in onnx.load(str(auto.path)).metadata_props)[
            "neat_fx.ort.disabled_optimizers.cpu"
        ]
    )
    # fusions: attention and skip-LayerNorm fused for BERT-style graphs
    assert fusions.fused_ops.get("MultiHeadAttention", 0) + fusions.fused_ops.get("Attention", 0) == 2
    assert fusions.fused_ops.get("SkipLayerNormalization", 0) >= 2
    # none: the exporter's raw graph, still verified
    assert plain.fused_ops.get("BiasGelu", 0) == 0 and plain.max_rel_diff <= 1e-4


def test_fp16_keeps_float32_io_and_fragile_ops(tmp_path):
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=4)
    randomize_adapters(nm, std=0.2)
    report = to_onnx(nm, example, tmp_path / "h.onnx", dtype="fp16")
    assert report.max_rel_diff <= 1e-2 and report.tolerance == 1e-2
    g = onnx.load(str(report.path)).graph
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert g.output[0].type.tensor_type.elem_type == f32
    kinds = {i.data_type for i in g.initializer if len(i.dims) == 2}
    assert f16 in kinds
    for node in g.node:
        if node.op_type == "LayerNormalization":
            scale = next(i for i in g.initializer if i.name == node.input[1])
            assert scale.data_type == f32


def test_approximate_mode_reports_its_drift(tmp_path, bert_onnx):
    model, example, other, patterns = zoo.bert()
    model.eval()
    _, exact = bert_onnx
    approx = to_onnx(model, example, tmp_path / "a.onnx", approximate=True)
    assert "FastGelu" in approx.fused_ops or "Gelu" in approx.op_counts
    assert any("GELU tanh" in o for o in approx.optimizations)
    assert approx.max_rel_diff > exact.max_rel_diff and approx.max_rel_diff <= 1e-3


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    model, example, other, patterns = zoo.home_grown()
    target = tmp_path / "m.onnx"
    monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", -1.0)
    with pytest.raises(ExportError, match=r"ONNX Runtime \(cpu\) and PyTorch disagree .* Nothing was written"):
        to_onnx(model, example, target)
    assert list(tmp_path.iterdir()) == []
    # an existing file at the destination is kept as it was
    target.write_bytes(b"previous")
    with pytest.raises(ExportError):
        to_onnx(model, example, target)
    assert target.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


class Eig(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.proj(x)
        return torch.linalg.eigh(h.transpose(-1, -2) @ h).eigenvalues


def test_bad_input(tmp_path, monkeypatch):
    model, example, other, patterns = zoo.home_grown()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, example, tmp_path / "missing" / "m.onnx")
    with pytest.raises(IsADirectoryError):
        to_onnx(model, example, tmp_path)
    with pytest.raises(neat_fx.CaptureError, match="does not run on the example inputs"):
        to_onnx(model, (torch.randn(2, 5, 7),), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="dtype must be one of"):
        to_onnx(model, example, tmp_path / "m.onnx", dtype="int8")
    with pytest.raises(ExportError, match="could not export"):
        to_onnx(Eig(), (torch.randn(3, 5, 4),), tmp_path / "e.onnx")
    assert list(tmp_path.iterdir()) == []
    # device="cuda" where ONNX Runtime lacks the CUDA provider (faked, so that this runs on a GPU machine too; with
    # the provider: test_cuda_sessions_keep_tf32_off_unless_asked): refused before any work, naming the fix
    import onnxruntime

    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [p for p in real if "CUDA" not in p])
    no_cuda = r"device='cuda' needs ONNX Runtime's CUDAExecutionProvider.*Install neat-fx\[gpu\]"
    with pytest.raises(RuntimeError, match=no_cuda):
        to_onnx(model, example, tmp_path / "m.onnx", device="cuda")
    existing = tmp_path / "x.onnx"
    onnx.save(onnx.ModelProto(), str(existing))
    with pytest.raises(RuntimeError, match=no_cuda):
        session(existing, "cuda")
    existing.unlink()
    assert neat_fx.export.runtime.resolve_device("auto") == ("cpu", ["CPUExecutionProvider"])
    assert list(tmp_path.iterdir()) == []


def test_import_neat_fx_does_not_import_onnx():
    code = "import sys, neat_fx; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_export(tmp_path):
    model, example, other, patterns = zoo.bert()
    model.save_pretrained(tmp_path / "base")
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    randomize_adapters(nm, std=0.2)
    neat_fx.save_adapters(nm, tmp_path / "ad")
    script = Path(sys.executable).with_name("neat-fx")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]
    r = subprocess.run(
        cmd
        + [
            "export",
            "--model",
            str(tmp_path / "base"),
            "--adapters",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--seq-len",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parity" in r.stdout and (tmp_path / "m.onnx").exists()
    nm.eval()
    with torch.no_grad():
        want = nm(**other)
    assert rel(want, ort_outputs(tmp_path / "m.onnx", other)) <= 1e-4
    r = subprocess.run(cmd + ["export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "verifies" in r.stdout and "--fp16" in r.stdout


def test_cli_export_options_reach_the_file(tmp_path, capsys, monkeypatch):
    """The documented CLI flags change the file they say they change: --optimize none --approximate (tanh GELU, no
    offline ORT optimisation) and --fp16 (fp16 weights, float32 inputs/outputs), both verified and near nm."""
    import onnx

    from neat_fx import cli

    model, example, other, patterns = zoo.bert()
    model.save_pretrained(tmp_path / "base")
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    randomize_adapters(nm, std=0.2)
    neat_fx.save_adapters(nm, tmp_path / "ad")
    nm.eval()
    with torch.no_grad():
        want = nm(**other)
    base = ["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "ad"), "--seq-len", "16"]

    out = tmp_path / "approx.onnx"
    assert cli.main([*base, "--out", str(out), "--optimize", "none", "--approximate", "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert "GELU tanh approximation" in report and "exporter optimiser" not in report and "offline" not in report
    graph = onnx.load(out).graph
    assert not any(n.op_type == "Erf" for n in graph.node)  # the exact GELU is gone
    assert 1e-6 < rel(want, ort_outputs(out, other)) <= 1e-2

    out = tmp_path / "fp16.onnx"
    assert cli.main([*base, "--out", str(out), "--fp16", "--device", "cpu"]) == 0
    assert "precision    fp16, verified on cpu" in capsys.readouterr().out
    model16 = onnx.load(out)
    dtypes = {i.data_type for i in model16.graph.initializer if len(i.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in dtypes and onnx.TensorProto.FLOAT not in dtypes  # matrices in fp16
    assert {i.type.tensor_type.elem_type for i in model16.graph.output} == {onnx.TensorProto.FLOAT}
    assert rel(want, ort_outputs(out, other)) <= 1e-2

    # --device reaches the export: cuda without ONNX Runtime's CUDA provider is refused in one line, nothing written
    import onnxruntime

    real = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [p for p in real if "CUDA" not in p])
    assert cli.main([*base, "--out", str(tmp_path / "cuda.onnx"), "--device", "cuda"]) == 2
    assert "neat-fx[gpu]" in capsys.readouterr().err and not (tmp_path / "cuda.onnx").exists()


def test_via_optimum_says_why_not_when_unavailable(tmp_path):
    from neat_fx.export import optimum_route

    ok, why = optimum_route.available()
    if ok:
        pytest.skip("optimum-onnx is importable here")
    model, example, other, patterns = zoo.bert()
    with pytest.raises(ExportError, match="transformers<4.58"):
        to_onnx(model, example, tmp_path / "o.onnx", via="optimum")
    assert list(tmp_path.iterdir()) == []


def test_via_optimum_exports_and_verifies(tmp_path):
    """Runs where optimum-onnx is importable (transformers<4.58: `make bench-optimum-env`)."""
    from neat_fx.export import optimum_route

    ok, why = optimum_route.available()
    if not ok:
        pytest.skip(why)
    model, example, other, patterns = zoo.bert()
    nm = neat_fx.transform(model, patterns, example, rank=4, trainable=["classifier*"])
    randomize_adapters(nm, std=0.2)
    report = to_onnx(nm, example, tmp_path / "o.onnx", via="optimum", optimum_level="O2")
    assert report.max_rel_diff <= 1e-4 and "ORTOptimizer O2" in report.optimizations
    assert report.fused_ops.get("SkipLayerNormalization", 0) > 0
    assert all(p.requires_grad is False for p in model.parameters())  # nm's model left unmerged
    with torch.no_grad():
        assert not any(
            torch.equal(model.get_parameter(s.name), neat_fx.fold(nm).get_parameter("model." + s.name))
            for s in nm.sites()
        )


def test_external_data_for_large_models(tmp_path, monkeypatch):
    """Models over 2 GB keep their weights in `<path>.data`: the mechanics, with the threshold lowered."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 1024)
    model, example, other, patterns = zoo.bert()
    model.eval()
    report = to_onnx(model, example, tmp_path / "big.onnx")
    assert report.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    g = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    locations = {e.value for t in g.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    with torch.no_grad():
        want = model(**other)
    assert rel(want, ort_outputs(report.path, other)) <= 1e-4


@pytest.mark.parametrize("case", ["bool", "bool_row_without_keys", "float", "causal", "gqa", "none"])
def test_eager_attention_matches_sdpa(case):
    from neat_fx.export.passes import eager_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    kw = {}
    if case.startswith("bool"):
        mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
        mask[..., 0] = True
        if case == "bool_row_without_keys":
            mask[1, 0, 2] = False  # sdpa returns zeros for this row
        kw["attn_mask"] = mask
    elif case == "float":
        kw["attn_mask"] = torch.randn(2, 1, 5, 5, generator=g)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    got = eager_attention(q, k, v, **kw)
    assert torch.allclose(got, want, atol=1e-6)
    if case == "bool_row_without_keys":
        assert torch.count_nonzero(got[1, :, 2]) == 0


class _RowsPerProduct(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the rows of every product with a weight that a graph runs: mm/addmm, and bmm against a weight
    broadcast over the batch (what linear on a strided 3-D input becomes); attention's bmm are not counted."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default):
            self.rows.append(args[-2].shape[0])
        elif func is torch.ops.aten.bmm.default and args[1].stride(0) == 0:
            self.rows.append(args[0].shape[0] * args[0].shape[1])
        return func(*args, **(kwargs or {}))


def _pruned(model, example):
    from neat_fx.transform import capture_plain

    container = capture_plain(model, ((), example) if isinstance(example, dict) else (example, {}), modes=("eval",))
    pruned, applied = onnx_export._export_container(container, ExportConfig())
    return container, pruned, applied


def _rows(module, inputs):
    with torch.no_grad(), _RowsPerProduct() as rec:
        out = call(module, inputs)
    return out, sorted(rec.rows)


def test_unread_positions_pruned_for_a_cls_classifier(bert_onnx):
    """BERT reads only [CLS] of the last block: its query, attention output and FFN run on one row per
    sequence, its keys/values on all; every output equal to PyTorch's, a sequence without any key included."""
    model, example, _, _ = zoo.bert()
    model.eval()
    container, pruned, applied = _pruned(model, example)
    assert any("positions no output reads" in a for a in applied)
    assert "attention scale folded into the query projection ×2" in applied  # 1/√d now in W_q, b_q
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        input_ids=torch.randint(0, 120, (3, 9), generator=g), attention_mask=torch.ones(3, 9, dtype=torch.long)
    )
    inputs["attention_mask"][1, 5:] = 0
    inputs["attention_mask"][2] = 0
    want, rows_before = _rows(container, inputs)
    got, rows_after = _rows(pruned, inputs)
    # 2 layers × 6 products on 27 rows + pooler and classifier on 3 → layer 1 keeps only k and v whole.
    assert rows_before == [3] * 2 + [27] * 12
    assert rows_after == [3] * 6 + [27] * 8
    assert (tensors(got)[0] - want.logits).abs().max() <= 1e-6
    with torch.no_grad():
        assert (tensors(got)[0] - model(**inputs).logits).abs().max() <= 1e-6
    exported, report = bert_onnx  # the same BERT (zoo.bert is seeded), exported with the default options
    assert any("positions no output reads" in o for o in report.optimizations)
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, model(**inputs).logits)
        assert rel(exported(**inputs), ort_outputs(report.path, inputs)) <= 1e-4


def test_unread_positions_kept_where_an_output_reads_them():
    """A model that returns the whole last hidden state, or selects through ops the pass does not know,
    is left as it was (0 ops narrowed) and still computes the same."""
    import transformers

    from neat_fx.export import passes

    base = transformers.BertModel(zoo.bert()[0].config).eval()  # last_hidden_state and the pooled [CLS]
    container, pruned, applied = _pruned(base, zoo.bert()[1])
    assert not any("positions no output reads" in a for a in applied)
    graph = container.graph("eval")
    before = [(n.op, str(n.target), str(n.args)) for n in graph.nodes]
    assert passes.prune_unread_positions(graph) == 0
    assert [(n.op, str(n.target), str(n.args)) for n in graph.nodes] == before


class _LastTokenEncoder(torch.nn.Module):
    """Home-grown: sdpa with a float mask, x @ W on a bare parameter, residual + layer norm, then the last
    position (a negative select) and a head."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.w = torch.nn.Parameter(torch.randn(d, d) / d**0.5)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 3)

    def forward(self, x, bias):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = self.norm(x + a.transpose(1, 2).reshape(b, s, d) @ self.w)
        return self.head(torch.relu(h[:, -1]))


def test_unread_positions_last_token_with_a_per_query_mask(tmp_path):
    torch.manual_seed(0)
    model = _LastTokenEncoder().eval()
    g = torch.Generator().manual_seed(1)
    example = (torch.randn(2, 6, 16, generator=g), torch.randn(2, 1, 6, 6, generator=g))
    container, pruned, applied = _pruned(model, example)
    assert any("positions no output reads" in a for a in applied)
    assert not any("scale folded" in a for a in applied)  # q, k, v share one projection: nothing to fold into
    inputs = (torch.randn(3, 5, 16, generator=g), torch.randn(3, 1, 5, 5, generator=g))
    want, rows_before = _rows(container, inputs)
    got, rows_after = _rows(pruned, inputs)
    # qkv stays whole (keys/values need every position); x @ w and the head read one row per sequence.
    assert rows_before == [3, 15, 15] and rows_after == [3, 3, 15]
    assert (tensors(got)[0] - model(*inputs)).abs().max() <= 1e-6
    with torch.no_grad():
        assert (tensors(want)[0] - model(*inputs)).abs().max() <= 1e-6
    report = to_onnx(model, example, tmp_path / "m.onnx", verify_inputs=[inputs])
    assert rel(model(*inputs), ort_outputs(report.path, inputs)) <= 1e-4


def test_cuda_sessions_keep_tf32_off_unless_asked(monkeypatch):
    """ONNX Runtime's CUDA EP uses TF32 by default, which breaks fp32 parity with PyTorch (1e-3 vs 1e-4):
    our sessions turn it off unless asked."""
    import onnxruntime

    from neat_fx.export import runtime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert runtime.resolve_device("cuda")[1][0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert runtime.resolve_device("auto", tf32=True)[1][0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    assert runtime.resolve_device("cpu")[1] == ["CPUExecutionProvider"]
    with pytest.raises(TypeError, match="tf32 must be True or False"):
        runtime.resolve_device("cuda", tf32="yes")


class _SharedAttention(torch.nn.Module):
    """One tensor in several attention roles: sdpa(h, h, h) or sdpa(q, q, v), then the first position."""

    def __init__(self, shared_qk_only: bool):
        super().__init__()
        self.shared_qk_only = shared_qk_only
        self.lin = torch.nn.Linear(16, 16)
        self.v = torch.nn.Linear(16, 16)

    def forward(self, x):
        b, n, d = x.shape
        h = self.lin(x).view(b, n, 2, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 8).transpose(1, 2) if self.shared_qk_only else h
        return torch.nn.functional.scaled_dot_product_attention(h, h, v).transpose(1, 2).reshape(b, n, d)[:, 0]


class _SquareOfSelf(torch.nn.Module):
    def forward(self, a):
        b = torch.tanh(a)
        return (b @ b)[0]


@pytest.mark.parametrize("case", ["qkv_one_tensor", "q_is_k", "matmul_with_itself"])
def test_passes_keep_a_tensor_whole_where_another_slot_needs_it(case):
    """A tensor narrowed for one argument slot must stay whole where the same call also reads it whole (keys,
    values, the other matmul operand), and 1/√d must not be folded into a projection that is also the keys."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "matmul_with_itself":
        model, example, inputs = _SquareOfSelf(), (torch.randn(4, 4, generator=g),), (torch.randn(6, 6, generator=g),)
    else:
        model = _SharedAttention(shared_qk_only=case == "q_is_k").eval()
        example, inputs = (torch.randn(2, 6, 16, generator=g),), (torch.randn(3, 5, 16, generator=g),)
    _, pruned, applied = _pruned(model, example)
    assert not any("scale folded" in a for a in applied)
    with torch.no_grad():
        assert (tensors(call(pruned, inputs))[0] - model(*inputs)).abs().max() <= 1e-6
