"""via="genai" with adapters=: one onnxruntime-genai base folder, one .onnx_adapter per NEAT adapter in its exact
LoRA form (neat_fx/export/genai_adapters.py). The base graph's LoRA inputs (names, count, zero defaults, symbolic
rank), one adapter file per adapter setting exactly those inputs, each adapter's greedy tokens in onnxruntime-genai
equal to neat_fx.generate's, switching back and forth, no adapter = the base model, an int4 base with fp32 adapters;
bad adapters refused by name with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime_genai")

import neat_fx  # noqa: E402
from neat_fx.errors import AdapterMismatchError, ConfigError  # noqa: E402

import decoders  # noqa: E402
from helpers import randomize_adapters  # noqa: E402

LAYERS = 2
SITES = 7  # q, k, v, o, gate, up, down per layer
PROMPT = [5, 17, 42, 9, 77, 31, 8, 64, 23, 11]
NEW = 12


@pytest.fixture(scope="module")
def genai():
    from neat_fx.export import genai_adapters, genai_route

    ok, why = genai_route.available()
    if not ok:
        pytest.skip(why)
    return genai_adapters


def build(seed: int = 0):
    """Qwen2, 2 layers, hidden 64 (GroupQueryAttention on CPU wants a head size that is a multiple of 16), tied head,
    no pad id (Qwen2's tokenizer class would add its own to the builder's placeholder tokenizer)."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = decoders._common(hidden_size=64, intermediate_size=128, tie_word_embeddings=True, pad_token_id=None)
    return T.Qwen2ForCausalLM(T.Qwen2Config(**cfg)).eval()


def adapter(model, seed: int, rank: int = 4, targets="all-linear", **options):
    nm = neat_fx.transform(model, targets, decoders.example_inputs(), rank=rank, modes=("eval",), seed=seed, **options)
    randomize_adapters(nm, std=0.3, seed=100 + seed)  # B ≠ 0: ΔW ≠ 0
    return nm


def expected(module, prompt=PROMPT) -> list[int]:
    """Greedy new tokens of a NeatModule (neat_fx.generate) or a plain model (its own generate), until eos."""
    ids = torch.tensor([prompt])
    if isinstance(module, neat_fx.NeatModule):
        out = neat_fx.generate(module, ids, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    else:
        out = module.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt) :].tolist()
    eos = 2
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


@pytest.fixture(scope="module")
def exported(genai, tmp_path_factory):
    """Three adapters — two NeatModules of rank 4, one saved folder of rank 2 — exported fp32 once."""
    model = build()
    nms = {"a": adapter(model, 0), "b": adapter(model, 1), "c": adapter(model, 2, rank=2)}
    root = tmp_path_factory.mktemp("genai_adapters")
    neat_fx.save_adapters(nms["c"], root / "saved_c")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = neat_fx.export.to_onnx(
        model, None, root / "out", via="genai", adapters={"a": nms["a"], "b": nms["b"], "c": root / "saved_c"}
    )
    # the caller's model as it was (loading the saved folder transforms it)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return model, nms, report


def test_one_base_and_one_adapter_file_per_adapter(genai, exported):
    import onnxruntime as ort
    from onnx import numpy_helper

    _, _, report = exported
    out = report.path
    assert sorted(p.name for p in out.iterdir()) == [
        "adapters", "genai_config.json", "model.onnx", "model.onnx.data", "neat_adapters.json",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "a.onnx_adapter",
        "b.onnx_adapter",
        "c.onnx_adapter",
    ]
    manifest = json.loads((out / "neat_adapters.json").read_text())
    assert manifest["adapters"] == {n: f"adapters/{n}.onnx_adapter" for n in "abc"}
    assert manifest["precision"] == "fp32"

    # the base graph: one lora_A and one lora_B input per adapted linear, rank axis symbolic, zeros by default
    graph = _graph(out).graph
    inputs = {i.name: i for i in graph.input if genai.is_lora_tensor(i.name)}
    assert len(inputs) == LAYERS * SITES * 2 == len(report.adapter_inputs) == len(manifest["inputs"])
    assert set(inputs) == set(report.adapter_inputs)
    assert sum(".lora_A." in n for n in inputs) == LAYERS * SITES
    assert "model.layers.0.attn.q_proj.lora_A.MatMul.weight" in inputs
    for name, value in inputs.items():
        dims = value.type.tensor_type.shape.dim
        assert dims[genai._rank_axis(name)].dim_param == genai.RANK, name
    defaults = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in inputs}
    assert set(defaults) == set(inputs) and all(not v.any() for v in defaults.values())
    assert report.op_counts.get("GroupQueryAttention") == LAYERS and "MatMulNBits" not in report.op_counts

    # each adapter file: exactly the LoRA inputs, at its rank
    for name, rank in (("a", 4), ("b", 4), ("c", 2)):
        params = ort.AdapterFormat.read_adapter(str(report.adapters[name])).get_parameters()
        assert set(params) == set(inputs), name
        q_a = params["model.layers.0.attn.q_proj.lora_A.MatMul.weight"].numpy()
        assert q_a.shape == (64, rank) and q_a.any()

    # the export's own verification: tokens identical, per adapter and with none active
    assert set(report.verification) == {"a", "b", "c"} and report.tokens_equal
    assert report.base_verification["tokens_equal"] and report.max_rel_diff < 1e-4
    assert all(v["batched"] and v["new_tokens"] == 16 for v in report.verification.values())
    assert "verification c: identical tokens" in str(report)


def test_each_adapter_gives_neat_fx_tokens_switching_back_and_forth(genai, exported):
    model, nms, report = exported
    served = neat_fx.export.GenaiAdapters(report.path)
    assert served.names == ("a", "b", "c")
    want = {name: expected(nm) for name, nm in nms.items()}
    want[None] = expected(model)  # no adapter active: the base model
    assert len({tuple(v) for v in want.values()}) == 4  # the adapters really differ, from each other and the base
    for name in ["a", "b", None, "c", "a", "c", "b", None, "a"]:  # one og.Model, the adapter switched per call
        assert served.generate(PROMPT, adapter=name, max_new_tokens=NEW) == want[name], name
    batch = served.generate(torch.tensor([PROMPT, PROMPT[::-1]]), adapter="b", max_new_tokens=NEW)
    assert batch[0] == want["b"] and batch[1] == expected(nms["b"], PROMPT[::-1])
    with pytest.raises(ConfigError, match="no adapter 'z'.*'a', 'b', 'c'"):
        served.generate(PROMPT, adapter="z")


def test_serving_refuses_an_adapter_file_of_another_export(genai, exported, tmp_path):
    import shutil

    _, _, report = exported
    copy = tmp_path / "copy"
    shutil.copytree(report.path, copy)
    shutil.copy(copy / "adapters" / "a.onnx_adapter", copy / "adapters" / "b.onnx_adapter")  # a's file named b
    with pytest.raises(AdapterMismatchError, match="b.onnx_adapter is not the adapter file of 'b'.*export the folder"):
        neat_fx.export.GenaiAdapters(copy)
    with pytest.raises(FileNotFoundError, match="not a genai folder exported with adapters="):
        neat_fx.export.GenaiAdapters(tmp_path)


def test_int4_base_with_fp32_adapters(genai, tmp_path):
    model = build()
    for name, seed in (("a", 0), ("b", 1)):  # saved folders, given as a list: named after the folders
        neat_fx.save_adapters(adapter(model, seed), tmp_path / name)
    folders = [tmp_path / "a", tmp_path / "b"]
    report = neat_fx.export.to_onnx(model, None, tmp_path / "out", via="genai", quantize="int4", adapters=folders)
    assert report.precision == "int4" and report.block_size == 32 and list(report.adapters) == ["a", "b"]
    # base weights int4 (q, k, v, o, gate, up, down per layer + the head), every LoRA MatMul fp32 on a graph input
    assert report.op_counts["MatMulNBits"] == LAYERS * SITES + 1
    lora_matmuls = [n for n in _graph(report.path).graph.node if "/lora_" in n.name and n.op_type == "MatMul"]
    assert len(lora_matmuls) == LAYERS * SITES * 2 == len(report.adapter_inputs)
    assert all(n.input[1] in report.adapter_inputs for n in lora_matmuls)
    # verified against gross errors only (int4 flips a random model's argmax): the correlation gate passed
    assert all(v["logits_min_corr"] >= 0.5 for v in report.verification.values())
    served = neat_fx.export.GenaiAdapters(report.path)
    a, b = (served.generate(PROMPT, adapter=n, max_new_tokens=NEW) for n in "ab")
    assert a != b and served.generate(PROMPT, adapter="a", max_new_tokens=NEW) == a


# ---------------------------------------------------------------------------------------------- refused


def _refused(tmp_path, error, match, module, adapters, **options):
    with pytest.raises(error, match=match):
        neat_fx.export.to_onnx(module, None, tmp_path / "out", via="genai", adapters=adapters, **options)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("saved"))
    assert left == [], left  # neither the folder nor the staging / scratch folders beside it


def test_bad_adapters_are_refused_naming_them_with_nothing_written(genai, tmp_path, monkeypatch):
    from neat_fx.export import ExportError
    from neat_fx.io import lora

    model = build()
    good = adapter(model, 0)
    other = build(seed=1)  # another base
    neat_fx.save_adapters(adapter(other, 3), tmp_path / "saved_other")

    _refused(tmp_path, AdapterMismatchError, "'x'.*another base model", model, {"a": good, "x": adapter(other, 3)})
    _refused(tmp_path, AdapterMismatchError, "'y'.*saved_other", model, {"a": good, "y": tmp_path / "saved_other"})
    _refused(
        tmp_path, AdapterMismatchError, "'a' and 'q' adapt different sites", model,
        {"a": good, "q": adapter(model, 4, targets=["*q_proj"])},
    )  # fmt: skip
    _refused(
        tmp_path, ConfigError, "'t' also trains parameters in full.*model.norm.weight", model,
        {"t": adapter(model, 5, trainable=["model.norm.weight"])},
    )  # fmt: skip
    _refused(
        tmp_path,
        ConfigError,
        "'h' adapts the output head \\(lm_head\\)",
        model,
        {"h": adapter(model, 6, targets=["*"])},
    )
    for name in ("a/b", "..", "", ".hidden", "x" * 65):
        _refused(tmp_path, ConfigError, "cannot name a file", model, {name: good})
    _refused(tmp_path, ConfigError, "differ only in case", model, {"A": good, "a": good})
    _refused(tmp_path, ConfigError, "empty", model, {})
    _refused(tmp_path, ConfigError, "a list in adapters= holds folders", model, [good])
    _refused(tmp_path, ConfigError, "adapter 'a': expected a NeatModule or a folder", model, {"a": 3})
    _refused(tmp_path, ConfigError, "dtype='fp32'", model, {"a": good}, dtype="fp16")
    _refused(tmp_path, ConfigError, "folded model", neat_fx.fold(good), {"a": good})
    _refused(tmp_path, ExportError, "'gpt2' family", decoders.build("gpt2"), {"a": good})

    # a site the LoRA form cannot express: save_adapters(format="lora")'s own refusal, naming the adapter
    monkeypatch.setattr(lora, "_lora_module", lambda nm, site: f"{site.name} (einsum)")
    _refused(tmp_path, AdapterMismatchError, "'a' cannot be served.*LoRA wraps nn.Linear", model, {"a": good})


def test_failed_verification_leaves_nothing(genai, tmp_path, monkeypatch):
    from neat_fx.export import ExportError, genai_route

    real = genai_route._verify

    def fail_on_b(*args, adapter=None, **kwargs):
        if adapter is not None and adapter[1] == "b":
            raise ExportError("verification failed (injected)")
        return real(*args, adapter=adapter, **kwargs)

    model = build()
    monkeypatch.setattr(genai_route, "_verify", fail_on_b)
    _refused(tmp_path, ExportError, "injected", model, {"a": adapter(model, 0), "b": adapter(model, 1)})
