"""to_onnx(..., task="text-generation-with-past") and neat_fx.export.generate: one file for prefill and cached
decoding with Optimum's names, decoder fusions counted, greedy tokens through ONNX Runtime identical to
PyTorch's on six decoder families (from a NeatModule, a fold and a merged model), int4/int8/fp16 with their
drift and token agreement, the runner's sampling/stopping/cache use, and bad input refused with nothing
written."""

from __future__ import annotations

import copy
import types

import numpy as np
import onnx
import pytest
import torch

import neat_fx
from neat_fx.errors import GenerationError
from neat_fx.export import ExportError, generate, session, to_onnx
from neat_fx.export import generation as gen_mod

import decoders
import zoo
from helpers import randomize_adapters

TASK = "text-generation-with-past"
NEW = 20
# fused ops every with-past file of the family must hold (2 layers): GroupQueryAttention per layer for the
# LLaMA-shaped families (neat_fx/export/gqa.py) — rotating q/k itself for LLaMA's heads of 16, after 2
# RotaryEmbedding for Qwen2's and Mistral's heads of 8 — and onnxscript's fusions for the others
_GQA = {
    "GroupQueryAttention": 2,
    "SkipSimplifiedLayerNormalization": 4,
    "SimplifiedLayerNormalization": 1,
}
FUSED = {
    "llama": dict(_GQA, RotaryEmbedding=None),
    "qwen2": dict(_GQA, RotaryEmbedding=4),
    "mistral": dict(_GQA, RotaryEmbedding=4),
    "phi3": {"MultiHeadAttention": 2, "SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1},
    "gemma2": {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 5},
    "gpt2": {"MultiHeadAttention": 2, "SkipLayerNormalization": 5},  # its Conv1D Gemms given 2-D input again
}
# Qwen2 is LLaMA with biased q/k/v, Mistral LLaMA with a sliding window (Gemma-2 has one too): nothing the export
# treats differently, slow to keep the default run near its budget
SLOW_FAMILIES = ("qwen2", "mistral")


def _transformed(name: str):
    # LLaMA with heads of 16: GroupQueryAttention's own rotary; Qwen2/Mistral (heads of 8): Split + RotaryEmbedding
    model = decoders.build(name, **(decoders.GQA_ROTARY if name == "llama" else {}))
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    return model, nm


@pytest.mark.slow  # two exports; the default run keeps the repaired GPT-2 case above
def test_a_fused_graph_the_runtime_refuses_is_exported_plain(tmp_path, monkeypatch):
    """Without our repair, onnxscript's attention fusion hands GPT-2's Conv1D Gemm a 3-D input and ONNX Runtime
    refuses the file: the export falls back to the plain graph, says so, and still generates PyTorch's tokens."""
    from neat_fx.export import onnx_export

    monkeypatch.setattr(onnx_export, "_flatten_attention_into_gemm", lambda model_ir: 0)
    model, nm = _transformed("gpt2")
    report = to_onnx(neat_fx.fold(nm), decoders.example_inputs(), tmp_path / "lm.onnx", task=TASK)
    assert any("decoder fusions refused by ONNX Runtime" in n and "plain graph" in n for n in report.notes)
    assert not any(o.startswith("transformer fusions") for o in report.optimizations)
    assert "MultiHeadAttention" not in report.fused_ops
    assert report.generation["token_agreement"] == 1.0


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """The LLaMA with-past file, exported from the NeatModule itself (folded first), shared by the runner tests."""
    model, nm = _transformed("llama")
    path = tmp_path_factory.mktemp("lm") / "llama.onnx"
    report = to_onnx(nm, decoders.example_inputs(), path, task=TASK)
    return model, nm, path, report


def _kv_path(proto) -> list[tuple]:
    """Per GroupQueryAttention: (producer of its key, of its value — None: packed into the query —, its past inputs,
    its present outputs)."""
    producers = {o: n.op_type for n in proto.graph.node for o in n.output if o}
    return [
        (producers.get(n.input[1]), producers.get(n.input[2]), tuple(n.input[3:5]), tuple(n.output[1:3]))
        for n in proto.graph.node
        if n.op_type == "GroupQueryAttention"
    ]


def _shape(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FAMILIES else n for n in decoders.DECODERS]
)
def test_family_with_past_generates_pytorchs_tokens(name, tmp_path, request):
    # the three kinds of module to_onnx takes: a NeatModule (folded first), a fold, a merged Hugging Face model
    kind = {"llama": "nm", "gpt2": "merged"}.get(name, "fold")
    if name == "llama":
        model, nm, path, report = request.getfixturevalue("llama_file")
    else:
        model, nm = _transformed(name)
        module = neat_fx.merge_into(copy.deepcopy(model), nm) if kind == "merged" else neat_fx.fold(nm)
        path = tmp_path / "lm.onnx"
        report = to_onnx(module, decoders.example_inputs(), path, task=TASK)

    proto = onnx.load(str(path))
    layers = model.config.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "position_ids"] + past
    assert [o.name for o in proto.graph.output] == ["logits"] + [p.replace("past_key_values", "present") for p in past]
    shapes = {v.name: _shape(v) for v in list(proto.graph.input) + list(proto.graph.output)}
    assert shapes["input_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["past_key_values.0.key"][0] == "batch_size" and shapes["past_key_values.0.key"][2] == (
        "past_sequence_length"
    )
    assert all(isinstance(shapes["past_key_values.0.key"][k], int) for k in (1, 3))
    assert shapes["logits"][:2] == ["batch_size", 1]  # logits="last": the position generation reads
    for op, count in FUSED[name].items():
        assert report.fused_ops.get(op) == count, (op, report.fused_ops)
    if name in ("llama", "qwen2", "mistral"):
        # the packed projection straight into the op (LLaMA), or keys rotated and values split off it (heads of 8);
        # the op reads the cache inputs and writes the cache outputs itself: nothing repeats key/value heads or
        # concatenates the cache
        assert "MultiHeadAttention" not in report.op_counts
        if name == "llama":  # one Split per layer left: the MLP's packed gate/up
            assert report.op_counts.get("Split") == layers and "RotaryEmbedding" not in report.op_counts
        key_value = (None, None) if name == "llama" else ("RotaryEmbedding", "Split")
        assert _kv_path(proto) == [
            key_value
            + ((f"past_key_values.{i}.key", f"past_key_values.{i}.value"),)
            + ((f"present.{i}.key", f"present.{i}.value"),)
            for i in range(layers)
        ]
        rotary = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
        assert {a.name: a.i for a in rotary[0].attribute}.get("do_rotary", 0) == (name == "llama")
        assert any(n.startswith("attention: layers 0–1 GroupQueryAttention") for n in report.notes), report.notes
    else:
        assert any(n.startswith("attention: layers 0–1 the model's own code (") for n in report.notes), report.notes

    # verification: logits of a prefill and a decode step, then 16 greedy tokens on two prompt lengths
    assert [p["step"] for p in report.parity] == ["prefill", "decode"]
    assert report.max_rel_diff <= 1e-4
    assert report.generation["token_agreement"] == 1.0 and report.generation["prompts"] == [8, 4]
    assert report.folded_first == (kind == "nm")

    ids, mask = decoders.left_padded((9, 5))
    want = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW)
    got = generate(path, ids, mask, max_new_tokens=NEW)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert torch.equal(got, want)


def test_runner_numpy_in_numpy_out_and_session_input(llama_file):
    _, nm, path, _ = llama_file
    ids, mask = decoders.left_padded((9, 5))
    want = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW).numpy()
    sess = session(path, "cpu")
    got = generate(sess, ids.numpy(), mask.numpy(), max_new_tokens=NEW)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    # one prompt, no mask: every token counts
    one = generate(sess, ids[:1], max_new_tokens=5)
    np.testing.assert_array_equal(one.numpy(), neat_fx.generate(nm, ids[:1], max_new_tokens=5).numpy())


def test_runner_feeds_one_token_per_step_into_a_cache_written_in_place(llama_file, monkeypatch):
    """The cache is used: after the prompt, every call sees one new token and a mask one longer; the file's
    attention is all GroupQueryAttention, so one buffer per layer (prompt + new tokens long) is bound once as both
    past and present, and the op writes each step's keys into it."""
    _, _, path, report = llama_file
    sess = session(path, "cpu")
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    assert meta["neat_fx.generation.cache_in_place"] == "1"
    seen, past, present = [], [], []
    kind = type(sess.io_binding())
    real_bind, real_in, real_out = kind.bind_cpu_input, kind.bind_ortvalue_input, kind.bind_ortvalue_output

    def bind_cpu(self, name, array):
        if name in ("input_ids", "attention_mask"):
            seen.append((name, array.shape))
        return real_bind(self, name, array)

    def bind_in(self, name, value):
        if name == "past_key_values.0.key":
            past.append(value)
        return real_in(self, name, value)

    def bind_out(self, name, value):
        if name == "present.0.key":
            present.append(value)
        return real_out(self, name, value)

    monkeypatch.setattr(kind, "bind_cpu_input", bind_cpu)
    monkeypatch.setattr(kind, "bind_ortvalue_input", bind_in)
    monkeypatch.setattr(kind, "bind_ortvalue_output", bind_out)
    ids, mask = decoders.left_padded((9, 5))
    timings = {}
    out = generate(sess, ids, mask, max_new_tokens=6, eos_token_id=[], timings=timings)
    assert seen[::2] == [("input_ids", (2, 9))] + [("input_ids", (2, 1))] * 5
    assert seen[1::2] == [("attention_mask", (2, n)) for n in (9, 10, 11, 12, 13, 14)]
    assert len(past) == len(present) == 1 and past[0].data_ptr() == present[0].data_ptr()
    keys = past[0].numpy()  # [2, kv heads, 9 + 6, head size]: 14 tokens fed, the last slot never written
    assert keys.shape[2] == 15
    real = np.concatenate([mask.numpy(), np.ones((2, 5), np.int64)], 1).astype(bool)  # the prompt's and 5 fed
    assert (np.abs(keys[:, :, :14]).sum(-1) > 0).all(1)[real].all() and not keys[:, :, 14].any()
    assert timings["decode_steps"] == 5 and timings["prefill_s"] > 0 and timings["decode_s"] > 0
    # the same tokens as the runner with a fresh cache per step (as for a file that does not offer in place)
    monkeypatch.undo()
    del meta["neat_fx.generation.cache_in_place"]
    monkeypatch.setattr(sess, "get_modelmeta", lambda: types.SimpleNamespace(custom_metadata_map=meta))
    assert torch.equal(out, generate(sess, ids, mask, max_new_tokens=6, eos_token_id=[]))


def test_runner_threads_share_one_session(llama_file):
    """Threads calling generate on one session at once (each call holds its own in-place buffers and binding) get
    what each call gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, path, _ = llama_file
    sess = session(path, "cpu")
    prompts = [decoders.left_padded(lengths, seed=seed) for seed, lengths in enumerate([(9, 5), (3,), (7, 7, 2)])]
    alone = [generate(sess, ids, mask, max_new_tokens=12, eos_token_id=[]) for ids, mask in prompts]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(2):
            together = list(pool.map(lambda p: generate(sess, *p, max_new_tokens=12, eos_token_id=[]), prompts))
            assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_runner_stops_on_eos_and_pads_finished_rows(llama_file):
    _, _, path, _ = llama_file
    ids, mask = decoders.left_padded((9, 5))
    free = generate(path, ids, mask, max_new_tokens=8, eos_token_id=[])
    first = free[:, 9]
    # the first row's first token as EOS: that row is padded from then on, the other runs on
    out = generate(path, ids, mask, max_new_tokens=8, eos_token_id=int(first[0]), pad_token_id=0)
    if int(first[1]) != int(first[0]):
        # the other row runs until it too gives that id (or the 8 tokens are out), as it did without a stop
        rest = free[1, 9:].tolist()
        stop = rest.index(int(first[0])) + 1 if int(first[0]) in rest else 8
        assert out.shape[1] == 9 + stop
        assert (out[0, 10:] == 0).all()
        assert torch.equal(out[1], free[1, : 9 + stop])
    # both rows' first tokens as EOS: generation ends after one step
    out = generate(path, ids, mask, max_new_tokens=8, eos_token_id=[int(first[0]), int(first[1])])
    assert out.shape == (2, 10)


def test_runner_sampling_is_seeded_and_top_k_one_is_greedy(llama_file):
    _, _, path, _ = llama_file
    ids, mask = decoders.left_padded((9, 5))
    sess = session(path, "cpu")
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    a = generate(sess, ids, mask, seed=3, **kw)
    b = generate(sess, ids, mask, seed=3, **kw)
    c = generate(sess, ids, mask, seed=4, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(sess, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate(sess, ids, mask, seed=9, top_k=1, **kw), greedy)


def test_sampling_rules_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.6, 0.3, 0.06, 0.04]] * 400))
    top2 = gen_mod._sample(logits, rng, 1.0, 2, 1.0)
    assert set(top2.tolist()) == {0, 1}
    assert 0.5 < (top2 == 0).mean() < 0.85  # 0.6 / 0.9 renormalised
    assert set(gen_mod._sample(logits, rng, 1.0, None, 0.5).tolist()) == {0}  # 0.6 alone reaches 0.5
    assert set(gen_mod._sample(logits, rng, 1.0, None, 0.8).tolist()) == {0, 1}


def test_adapters_are_in_the_file(llama_file):
    """The file's tokens are the adapted model's (above) and not the base model's own generate."""
    model, nm, path, _ = llama_file
    ids, mask = decoders.left_padded((9, 5))
    assert not torch.equal(generate(path, ids, mask, max_new_tokens=NEW), _hf(model, ids, mask))


def _hf(model, ids, mask):
    gc = model.generation_config
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        use_cache=True,
        pad_token_id=gc.pad_token_id,
        eos_token_id=gc.eos_token_id,
    )


def _tied_llama(seed=0, std=0.05):
    """A wider LLaMA (hidden 128, vocabulary 4000) with its head tied to the embedding: whole int4 blocks of 32
    and 128, and a table large enough to see in the file size. Adapters random with `std`."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(
        **decoders._common(
            hidden_size=128, intermediate_size=256, vocab_size=4000, initializer_range=0.02, tie_word_embeddings=True
        )
    )
    model = T.LlamaForCausalLM(cfg).eval()
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=std, seed=5)
    return model, nm


@pytest.fixture(scope="module")
def tied_llama():
    """The tied LLaMA with adapters that matter (std 0.2: mean |Δ logits| 0.15 vs base, int4's error ≈ 0.04-0.06),
    made once for the tests below, which only read it."""
    return _tied_llama(std=0.2)


@pytest.fixture(scope="module")
def tied_int4_cli(tied_llama, tmp_path_factory):
    """`tied_llama` saved and exported once by `neat-fx export --task text-generation-with-past --quantize int4
    --block-size 32` (in process): read by the CLI test and, as its block-32 file, by the int4 test. Returns
    (exit code, stdout, stderr, the file, the report to_onnx returned to the CLI)."""
    import contextlib
    import io

    from neat_fx import export as export_package
    from neat_fx.cli import main

    model, nm = tied_llama
    root = tmp_path_factory.mktemp("tied_int4")
    model.save_pretrained(root / "base")
    neat_fx.save_adapters(nm, root / "adapters")
    out = root / "int4_32.onnx"
    reports = []

    def keep_report(*args, **kwargs):
        reports.append(to_onnx(*args, **kwargs))
        return reports[-1]

    argv = ["export", "--model", str(root / "base"), "--adapters", str(root / "adapters"), "--out", str(out)]
    argv += ["--task", TASK, "--quantize", "int4", "--block-size", "32", "--seq-len", "8"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # what `neat-fx export` sets for itself, undone here
        mp.setattr(export_package, "to_onnx", keep_report)  # the CLI imports it from there when it runs
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)
    return rc, stdout.getvalue(), stderr.getvalue(), out, reports[-1] if reports else None


def _prefill_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """The with-past file's logits for unpadded prompts `ids` and an empty cache, through ONNX Runtime (not the
    export's own verification)."""
    sess = session(path, "cpu")
    layout = gen_mod._Layout(sess)
    b, n = ids.shape
    feed = {"input_ids": ids.numpy().astype(layout.ids_dtype), "attention_mask": np.ones((b, n), np.int64)}
    if layout.position_ids:
        feed["position_ids"] = np.arange(n, dtype=np.int64)[None].repeat(b, 0)
    for name in layout.past:
        heads, size = layout.shapes[name]
        feed[name] = np.zeros((b, heads, 0, size), layout.dtype)
    return torch.from_numpy(sess.run(None, feed)[layout.logits_index]).float()[:, -1]


def _quant_and_adapter_distance(path, adapted, base, vocab: int) -> tuple[float, float]:
    """Mean |Δ logits| of the file against the adapted model (its quantization error) and against the base model
    (PyTorch fp32 both), on 2 random prompts of 16 tokens."""
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(16)[None].repeat(2, 1))
    got = _prefill_logits(path, ids)
    with torch.no_grad():
        quant = float((got - adapted(**kw).logits[:, -1]).abs().mean())
        off = float((got - base(**kw).logits[:, -1]).abs().mean())
    return quant, off


#: mean |Δ logits| of a quantized file against the base model over that against the adapted model (whose adapters
#: matter): at least this. Measured int4 (std 0.2 adapters): 3.8 (block 32), 2.9 (block 128).
ADAPTER_OVER_QUANT = 2.0


def test_int4_quantizes_every_linear_the_tied_head_and_the_table(tied_llama, tied_int4_cli, tmp_path):
    """2 layers × 4 MatMuls (q/k/v packed into one, gate/up into one, o, down) and the head (tied: quantized as its
    own transposed copy) become MatMulNBits, the embedding table GatherBlockQuantized; block 32 and 128 recorded;
    smaller files; drift and agreement reported. Block 32 is the file the CLI wrote (`tied_int4_cli`), block 128
    exported here."""
    model, nm = tied_llama  # adapters that matter: mean |Δ logits| 0.15 vs base, int4's error ≈ 0.04-0.06
    folded = neat_fx.fold(nm)
    table_bytes = 4000 * 128 * 4
    sizes = {}
    for block in (32, 128):
        if block == 32:
            rc, _, err, path, report = tied_int4_cli
            assert rc == 0 and report is not None, err[-2000:]
        else:
            path = tmp_path / f"int4_{block}.onnx"
            report = to_onnx(folded, decoders.example_inputs(), path, task=TASK, quantize="int4", block_size=block)
        counts = report.op_counts
        assert counts.get("MatMulNBits") == 2 * 4 + 1 and counts.get("GatherBlockQuantized") == 1, counts
        assert not counts.get("MatMul") and not counts.get("FusedMatMul"), counts  # nothing left in float
        node = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits")
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["block_size"] == block and attrs["bits"] == 4 and attrs["accuracy_level"] == 4
        # changed, not broken: measured max rel 0.17 / 0.24, min cosine 0.979 / 0.966 (blocks 32 / 128)
        assert 0.01 < report.max_rel_diff < 0.5 and min(p["min_cosine"] for p in report.parity) > 0.95
        # the adapted weights were quantized, not the base's: nearer the adapted model than the base by a margin
        quant, off = _quant_and_adapter_distance(path, folded, model, 4000)
        assert off >= ADAPTER_OVER_QUANT * quant, (block, quant, off)
        # greedy token agreement with PyTorch is reported, not gated: this random model's logits are flat (scale
        # 1.6), so int4 flips the argmax early (measured 0.125 / 0.0 of 16 new tokens); the logits above are gated
        assert isinstance(report.generation["token_agreement"], float)
        assert any(o.startswith("int4 weight-only") for o in report.optimizations)
        sizes[block] = report.size_bytes
    assert sizes[32] < table_bytes / 2 and sizes[128] < sizes[32]
    ids, mask = decoders.left_padded((9, 5))
    out = generate(tied_int4_cli[3], ids, mask, max_new_tokens=8)
    assert out.shape[0] == 2 and out.shape[1] <= 17


def test_int4_with_the_embedding_table_left_float(tied_llama, tmp_path):
    """quantize_embedding=False: every MatMul (the tied head's transposed copy too) int4, the table a float Gather
    read once per token; the same tokens path, a larger file than with the table in int4."""
    model, nm = tied_llama
    path = tmp_path / "lm.onnx"
    report = to_onnx(
        neat_fx.fold(nm), decoders.example_inputs(), path, task=TASK, quantize="int4", quantize_embedding=False
    )
    counts = report.op_counts
    assert counts.get("MatMulNBits") == 2 * 4 + 1 and not counts.get("GatherBlockQuantized"), counts
    proto = onnx.load(str(path))
    tables = {t.name for t in proto.graph.initializer if list(t.dims) == [4000, 128] and t.data_type == 1}
    assert [n.op_type for n in proto.graph.node if n.input and n.input[0] in tables] == ["Gather"]
    assert report.size_bytes > 4000 * 128 * 4 and min(p["min_cosine"] for p in report.parity) > 0.95
    with pytest.raises(neat_fx.ConfigError, match="quantize_embedding=False"):
        to_onnx(
            neat_fx.fold(nm),
            decoders.example_inputs(),
            tmp_path / "x.onnx",
            task=TASK,
            quantize="int8",
            quantize_embedding=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx"]


def test_fp32_file_holds_a_tied_table_once(tied_llama, tmp_path):
    model, nm = tied_llama
    report = to_onnx(neat_fx.fold(nm), decoders.example_inputs(), tmp_path / "lm.onnx", task=TASK)
    proto = onnx.load(str(tmp_path / "lm.onnx"))
    tables = [t for t in proto.graph.initializer if sorted(t.dims) == [128, 4000]]
    assert len(tables) == 1
    assert report.op_counts.get("FusedMatMul") == 1
    unique_bytes = sum(p.numel() * 4 for p in model.parameters())  # parameters() lists a tied table once
    assert unique_bytes < report.size_bytes < unique_bytes + 4000 * 128 * 4 / 4
    assert report.generation["token_agreement"] == 1.0


@pytest.mark.slow
def test_int8_and_fp16_with_past(llama_file, tmp_path):
    model, nm, _, _ = llama_file
    r8 = to_onnx(nm, decoders.example_inputs(), tmp_path / "int8.onnx", task=TASK, quantize="int8")
    assert r8.op_counts.get("DynamicQuantizeLinear") or r8.op_counts.get("MatMulInteger")
    # measured: 0.656 of the new tokens agree with PyTorch's greedy ones, min cosine 0.999; the file is the adapted
    # model's: mean |Δ logits| 0.042 against it, 1.11 against the base (26×)
    assert r8.generation["token_agreement"] >= 0.4 and min(p["min_cosine"] for p in r8.parity) > 0.99
    quant, off = _quant_and_adapter_distance(tmp_path / "int8.onnx", neat_fx.fold(nm), model, decoders.VOCAB)
    assert off >= 10 * quant, (quant, off)
    r16 = to_onnx(nm, decoders.example_inputs(), tmp_path / "fp16.onnx", task=TASK, dtype="fp16")
    proto = onnx.load(str(tmp_path / "fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16  # the cache stays fp16 between steps
    assert types["present.0.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert r16.max_rel_diff <= 2e-2
    ids, mask = decoders.left_padded((9, 5))
    assert generate(tmp_path / "fp16.onnx", ids, mask, max_new_tokens=6).shape[0] == 2


def test_cli_export_with_past_int4(tied_int4_cli):
    rc, text, err, out, _ = tied_int4_cli  # `neat-fx export ... --quantize int4 --block-size 32`, run once
    assert rc == 0 and out.is_file(), err[-2000:]
    assert "generation   greedy" in text and "MatMulNBits" in text
    assert "past_key_values.1.value" in [i.name for i in onnx.load(str(out)).graph.input]


# ---- bad input: clear errors, nothing written -------------------------------------------------------------------


def test_encoder_and_plain_modules_are_refused(tmp_path):
    bert, example, _, patterns = zoo.bert()
    with pytest.raises(ExportError, match="no generation head"):
        to_onnx(bert.eval(), example, tmp_path / "x.onnx", task=TASK)
    with pytest.raises(ExportError, match="task=None"):  # transformed, too
        to_onnx(neat_fx.transform(bert, patterns, example), example, tmp_path / "x.onnx", task=TASK)
    ids = torch.randint(0, 90, (2, 6))
    plain = torch.nn.Sequential(torch.nn.Embedding(90, 16), torch.nn.Linear(16, 90))
    with pytest.raises(ExportError, match="no cache / past_key_values|cannot run with one"):
        to_onnx(plain, (ids,), tmp_path / "y.onnx", task=TASK)
    assert list(tmp_path.iterdir()) == []


def test_bad_options_and_paths(tmp_path):
    model = decoders.build("llama")
    ex = decoders.example_inputs()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, ex, tmp_path / "missing" / "lm.onnx", task=TASK)
    with pytest.raises(neat_fx.ConfigError, match="block_size"):
        to_onnx(model, ex, tmp_path / "lm.onnx", task=TASK, quantize="int4", block_size=48)
    with pytest.raises(neat_fx.ConfigError, match="task="):
        to_onnx(model, ex, tmp_path / "lm.onnx", task="summarization")
    with pytest.raises(neat_fx.ConfigError, match="applies to fp32"):
        to_onnx(model, ex, tmp_path / "lm.onnx", task=TASK, quantize="int4", dtype="fp16")
    assert list(tmp_path.iterdir()) == []


def test_int4_without_a_large_enough_matmul_is_refused(tmp_path):
    model = decoders.build("llama")  # hidden 32: no weight has 256 input features
    with pytest.raises(ExportError, match="block_size=256"):
        to_onnx(model, decoders.example_inputs(), tmp_path / "lm.onnx", task=TASK, quantize="int4", block_size=256)
    with pytest.raises(ExportError, match="block_size=256"):  # the route without a cache checks the same
        to_onnx(model, decoders.example_inputs(), tmp_path / "lm.onnx", quantize="int4", block_size=256)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    from neat_fx.export import decoder

    def broken(*a, **k):
        raise ExportError("forced")

    monkeypatch.setattr(decoder, "_verify_generation", broken)
    (tmp_path / "lm.onnx").write_bytes(b"old")
    with pytest.raises(ExportError, match="forced"):
        to_onnx(decoders.build("llama"), decoders.example_inputs(), tmp_path / "lm.onnx", task=TASK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx"]
    assert (tmp_path / "lm.onnx").read_bytes() == b"old"


def test_runner_bad_input(llama_file, tmp_path):
    _, _, path, _ = llama_file
    ids, mask = decoders.left_padded((9, 5))
    for bad in (0, -2, 2.5):
        with pytest.raises(GenerationError, match="max_new_tokens"):
            generate(path, ids, mask, max_new_tokens=bad)
    right = torch.flip(mask, [1])
    with pytest.raises(GenerationError, match="left"):
        generate(path, ids, right, max_new_tokens=4)
    with pytest.raises(GenerationError, match="temperature"):
        generate(path, ids, mask, max_new_tokens=4, do_sample=True, temperature=0)
    # past the rotary table (max_position_embeddings 128): refused before the prompt runs, not mid-generation
    with pytest.raises(GenerationError, match=r"needs 129 positions; this file's rotary table holds 128"):
        generate(path, ids, mask, max_new_tokens=120)
    assert generate(path, ids, mask, max_new_tokens=119, eos_token_id=[]).shape == (2, 128)
    # an ONNX file without a cache: what it lacks, and how to export one
    plain = tmp_path / "plain.onnx"
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Cast", ["input_ids"], ["logits"], to=onnx.TensorProto.FLOAT)],
        "no_cache",
        [h.make_tensor_value_info(n, onnx.TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask")],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s"])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(plain))
    with pytest.raises(GenerationError, match="text-generation-with-past"):
        generate(plain, ids, mask, max_new_tokens=4)
    with pytest.raises(FileNotFoundError):
        generate(tmp_path / "none.onnx", ids, mask, max_new_tokens=4)
    with pytest.raises(GenerationError, match="InferenceSession or the path"):
        generate(5, ids, mask, max_new_tokens=4)


def test_cli_with_past_on_an_encoder_is_one_line(tmp_path, capsys):
    from neat_fx.cli import main

    bert, example, _, patterns = zoo.bert()
    nm = neat_fx.transform(bert, patterns, example)
    bert.save_pretrained(tmp_path / "base")
    neat_fx.save_adapters(nm, tmp_path / "adapters")
    out = tmp_path / "lm.onnx"
    argv = ["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"), "--out", str(out)]
    rc = main(argv + ["--task", TASK, "--seq-len", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "no generation head" in err and "task=None" in err
    assert not out.exists()
    # --float-embedding without int4: refused before loading anything
    rc = main(argv + ["--quantize", "int8", "--float-embedding"])
    err = capsys.readouterr().err
    assert rc == 2 and "--float-embedding applies to --quantize int4" in err and not out.exists()


@pytest.mark.slow  # two exports of the wider model
def test_weights_over_the_protobuf_limit_go_beside_the_file(tmp_path, monkeypatch):
    """A model over 2 GB keeps its weights in `<file>.data` (here the limit is lowered to 3 MB); int8 of it fits
    in one file again. Both renamed into place together, nothing else left in the folder."""
    from neat_fx.export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 3_000_000)  # fp32 3.2 MB, int8 2.8 MB
    _, nm = _tied_llama()
    fp32 = to_onnx(nm, decoders.example_inputs(), tmp_path / "fp32.onnx", task=TASK)
    assert fp32.external_data and (tmp_path / "fp32.onnx.data").is_file()
    int8 = to_onnx(nm, decoders.example_inputs(), tmp_path / "int8.onnx", task=TASK, quantize="int8")
    assert not int8.external_data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "fp32.onnx.data", "int8.onnx"]
    ids, mask = decoders.left_padded((9, 5))
    assert torch.equal(
        generate(tmp_path / "fp32.onnx", ids, mask, max_new_tokens=8), neat_fx.generate(nm, ids, mask, max_new_tokens=8)
    )


def _outside_vocabulary(family: str):
    """A decoder of vocabulary 128 whose EOS (and pad) ids lie outside it: GPT-2's default EOS 50256 (its pad
    falls back to it), a LLaMA with EOS 50256 and a pad token added without resizing (pad id = 128)."""
    import transformers as T

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
        model, pad = T.GPT2LMHeadModel(cfg), 50256
    else:
        model, pad = T.LlamaForCausalLM(T.LlamaConfig(**decoders._common(vocab_size=128, eos_token_id=50256))), 128
        model.generation_config.pad_token_id = pad
    model.config.use_cache = False
    return model.eval(), pad


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pad_and_eos_ids_outside_the_vocabulary(family, tmp_path):
    model, pad = _outside_vocabulary(family)
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=4, seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    example = decoders.example_inputs()
    example["input_ids"] = example["input_ids"].masked_fill(example["attention_mask"] == 0, pad)  # a tokenizer's
    report = to_onnx(nm, example, tmp_path / "lm.onnx", task=TASK)
    assert report.generation["token_agreement"] == 1.0
    meta = {p.key: p.value for p in onnx.load(str(report.path), load_external_data=False).metadata_props}
    assert meta["neat_fx.generation.eos_token_id"] == "50256"  # the model's own ids, recorded as they are
    assert meta["neat_fx.generation.pad_token_id"] == ("" if family == "gpt2" else "128")
    assert meta["neat_fx.generation.vocab_size"] == "128"

    merged = copy.deepcopy(model)
    neat_fx.merge_into(merged, nm)
    ids, mask = decoders.left_padded((9, 5), pad=pad)  # left-padded with the out-of-vocabulary pad id
    width = ids.shape[1]
    got = generate(report.path, ids, mask, max_new_tokens=NEW)  # EOS 50256 never comes: every row runs on
    assert got.shape == (2, width + NEW) and torch.equal(got[:, :width], ids)
    in_vocab = ids.masked_fill(mask == 0, 0)  # Hugging Face looks every id up, padding included
    want = merged.generate(
        input_ids=in_vocab, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )  # its own EOS, 50256: never matches either
    assert torch.equal(got[:, width:], want[:, width:])

    # a row that stops is filled with the pad id, outside the vocabulary, and the model is fed an id inside it
    stop = int(got[1, width])
    stopped = generate(report.path, ids, mask, max_new_tokens=NEW, eos_token_id=stop, pad_token_id=pad)
    assert stopped[1, width] == stop and bool((stopped[1, width + 1 :] == pad).all())
    first = int((got[0, width:] == stop).nonzero()[0]) if bool((got[0, width:] == stop).any()) else NEW
    assert torch.equal(stopped[0, width : width + first + 1], got[0, width : width + first + 1])

    real = ids.clone()
    real[0, -1] = 128
    with pytest.raises(GenerationError, match=r"input_ids\[0, 8\] = 128 lies outside the model's vocabulary of 128"):
        generate(report.path, real, mask, max_new_tokens=2)
