"""NEAT on a quantized base (QLoRA-style): torchao NF4 and int8 weight-only, bitsandbytes 4-bit NF4 with and without
double quantization, on a tiny random LLaMA on CPU (issue 22; neat_fx/quantized.py, docs/quantized.md).

Every test checks structure (ops counted, the base still quantized, no dequantized copy kept) and numbers against a
reference: the *dequantized-weight model* — a float copy of the model whose weights are the dequantized values,
computed here with each library's own dequantization — with ΔW added by tests/helpers.py's float64 NEAT."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

import neat_fx  # noqa: E402
from neat_fx import quantized  # noqa: E402
from neat_fx.errors import AdapterMismatchError, MergeError, PatternError  # noqa: E402

import decoders  # noqa: E402
from helpers import call, randomize_adapters, reference_model, rel_diff  # noqa: E402

FORMATS = ("torchao.nf4", "torchao.int8", "bnb.nf4", "bnb.nf4-dq")
#: bitsandbytes' 8-bit layers too, in the slow run (-m slow)
ALL_FORMATS = (*FORMATS, pytest.param("bnb.int8", marks=pytest.mark.slow))
PATTERNS = ["*q_proj", "*v_proj"]
LAYERS, LINEARS_PER_LAYER = 2, 7  # q k v o gate up down: every one quantized, the head left in float


def _projection(module, name) -> bool:
    return isinstance(module, torch.nn.Linear) and "lm_head" not in name


def quantize(model, fmt: str):
    """`model` with every projection (not the head) quantized in `fmt`, as a user does it with each library."""
    if fmt == "torchao.nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        for name, mod in model.named_modules():
            if _projection(mod, name):  # block sizes small enough for 16×32 weights
                mod.weight = torch.nn.Parameter(to_nf4(mod.weight.detach(), 16, 8), requires_grad=False)
    elif fmt == "torchao.int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_projection)
    elif fmt == "bnb.int8":
        import bitsandbytes as bnb

        for name, mod in list(model.named_modules()):
            if _projection(mod, name):
                layer = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=False, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(
                    mod.weight.detach().clone(), requires_grad=False, has_fp16_weights=False
                )
                model.set_submodule(name, layer.to("cpu"))
    else:
        import bitsandbytes as bnb

        double = fmt.endswith("-dq")
        for name, mod in list(model.named_modules()):
            if _projection(mod, name):
                layer = bnb.nn.Linear4bit(
                    mod.in_features,
                    mod.out_features,
                    bias=mod.bias is not None,
                    quant_type="nf4",
                    compress_statistics=double,
                    compute_dtype=torch.float32,
                )
                layer.weight = bnb.nn.Params4bit(
                    mod.weight.detach().clone(), requires_grad=False, quant_type="nf4", compress_statistics=double
                )
                model.set_submodule(name, layer.to("cpu"))  # bitsandbytes quantizes on the move
    return model


def dequantized_model(float_model, quantized_model):
    """The reference: a float copy whose projections hold the quantized model's weights, dequantized."""
    ref = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if _projection(mod, name):
                q = quantized_model.get_submodule(name).weight
                mod.weight.copy_(_library_dequantize(q))
    return ref


def _library_dequantize(q):
    """Each library's own dequantization (not neat_fx's dispatch)."""
    if type(q).__name__ == "NF4Tensor":
        return q.get_original_weight()
    if type(q).__name__ == "Int8Tensor":
        return q.qdata.float() * q.scale.float().reshape(-1, 1)
    if type(q).__name__ == "Int8Params":  # LLM.int8(): row-wise absmax scales over 127
        return q.data.float() * q.SCB.float().reshape(-1, 1) / 127
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(q.data, q.quant_state)


def build(fmt: str, seed: int = 0):
    """(float model, quantized model, example inputs) — two copies of one random tiny LLaMA."""
    float_model = decoders.build("llama", seed=seed)
    return float_model, quantize(copy.deepcopy(float_model), fmt), decoders.example_inputs()


def _counts(graph) -> Counter:
    return Counter(
        "dequantize" if quantized.is_dequantize(n) else str(n.target).split(".")[0] if n.op == "call_module" else ""
        for n in graph.nodes
        if n.op in ("call_function", "call_module")
    ) + Counter(str(n.target) for n in graph.nodes if n.op == "call_function" and "linear" in str(n.target))


@pytest.fixture(scope="module", params=ALL_FORMATS)
def case(request):
    float_model, model, inputs = build(request.param)
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0)
    return request.param, float_model, model, inputs, nm


# -- 1. sites on quantized weights -------------------------------------------------------------------------------
def test_sites_structure_and_numbers(case):
    fmt, float_model, model, inputs, nm = case
    kind = fmt.removesuffix("-dq")
    sites = nm.sites()
    assert [s.quantization for s in sites] == [kind] * 4
    assert {s.shape for s in sites} == {(32, 32), (16, 32)} and {s.dtype for s in sites} == {"float32"}
    for mode in nm.modes:
        counts = _counts(nm.graph(mode))
        assert counts["dequantize"] == LAYERS * LINEARS_PER_LAYER  # every quantized weight, read once
        assert counts["adapters"] == 4
        assert counts["aten.linear.default"] == LAYERS * LINEARS_PER_LAYER + 1  # + the float head
        assert not any("access_subclass_inner_tensor" in str(n.target) for n in nm.graph(mode).nodes)
    # the base stays quantized and is shared; nm holds no dequantized copy of any weight
    q = model.model.layers[0].self_attn.q_proj.weight
    assert quantized.format_of(q) == kind and nm.model is model
    site_shapes = {s.shape for s in sites} | {(64, 32), (32, 64)}
    own = [t for n, t in nm.named_buffers() if not n.startswith("model.")]
    own += [t for n, t in nm.named_parameters() if not n.startswith("model.")]
    assert not any(tuple(t.shape) in site_shapes for t in own)
    # B = 0: nm is the quantized base exactly (int8: torchao's own kernel scales after the matmul)
    reference = dequantized_model(float_model, model)
    nm.eval()
    with torch.no_grad():
        out = call(nm, inputs)
        base = call(quantized.eager_view(model), inputs)
        assert rel_diff(out, base) <= (1e-6 if kind == "torchao.int8" else 0.0)
        assert rel_diff(out, call(reference, inputs)) <= 1e-6
        # adapters applied by hand (float64 NEAT) on the dequantized weights
        saved = {k: v.clone() for k, v in nm.adapters.state_dict().items()}
        randomize_adapters(nm, std=0.3, seed=1)
        try:
            assert rel_diff(call(nm, inputs), call(reference_model(reference, nm), inputs)) < 1e-5
        finally:
            nm.adapters.load_state_dict(saved)


def test_training_steps_reduce_the_loss(case):
    fmt, _, model, inputs, _ = case
    labels = inputs["input_ids"].clone()
    nm = neat_fx.transform(model, PATTERNS, dict(inputs, labels=labels), rank=4, seed=0, scale=2.0)
    trained = [p for p in nm.parameters() if p.requires_grad]
    assert {id(p) for p in trained} == {id(p) for p in nm.adapters.parameters()}
    opt = torch.optim.AdamW(trained, lr=1e-2)
    nm.train()
    losses = []
    for _ in range(8):
        loss = nm(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert quantized.format_of(model.model.layers[1].self_attn.v_proj.weight) == fmt.removesuffix("-dq")


def test_backward_keeps_quantized_weights_not_dequantized_copies():
    """A training step keeps the quantized weights for the backward and dequantizes again there (as bitsandbytes'
    and torchao's own QLoRA linears do): the bytes a forward leaves for the backward stay far below one dequantized
    copy of the model, and the gradients are those of keeping the copies."""
    import transformers

    from neat_fx.memory import LiveTensorBytes

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**decoders._common(hidden_size=128, intermediate_size=256))
    model = quantize(transformers.LlamaForCausalLM(cfg), "torchao.nf4")
    inputs = decoders.example_inputs()
    labels = inputs["input_ids"]
    nm = neat_fx.transform(model, PATTERNS, dict(inputs, labels=labels), rank=4, seed=0).train()
    dequantized_bytes = sum(4 * m.weight.numel() for n, m in model.named_modules() if _projection(m, n))

    def step(recompute: bool):
        with contextlib.ExitStack() as stack:
            if not recompute:
                stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                    quantized, "recompute_in_backward", contextlib.nullcontext
                )
            with LiveTensorBytes() as live:
                out = nm(**inputs, labels=labels)
                kept = live.now - live.bytes_of(out)
        out.loss.backward()
        grads = [p.grad.clone() for p in nm.adapters.parameters()]
        nm.zero_grad()
        return kept, grads

    kept, grads = step(recompute=True)
    kept_copies, grads_copies = step(recompute=False)
    assert kept_copies > dequantized_bytes  # without: every dequantized weight downstream of an adapter is kept
    assert kept < dequantized_bytes / 4
    for g, h in zip(grads, grads_copies):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["torchao.nf4", "bnb.nf4-dq"])
def test_activation_checkpointing_gives_the_same_gradients(fmt):
    _, model, inputs = build(fmt, seed=11)
    labels = inputs["input_ids"]
    nm = neat_fx.transform(model, PATTERNS, dict(inputs, labels=labels), rank=4, seed=0).train()
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(11))
    grads = []
    for checkpointing in (False, True):
        nm.set_checkpointing(checkpointing)
        nm(**inputs, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in nm.adapters.parameters()])
        nm.zero_grad()
    assert len(nm.checkpointed) == LAYERS  # every decoder layer recomputed in the backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- 2. downstream: fold, save/load, LoRA form, generate, checkpoints ---------------------------------------------
def test_fold_is_a_plain_module_on_dequantized_weights(case):
    fmt, float_model, model, inputs, nm = case
    randomize_adapters(nm, std=0.3, seed=2)
    try:
        folded = neat_fx.fold(nm)
        counts = _counts(folded.graph("eval"))
        assert counts["adapters"] == 0
        assert counts["dequantize"] == LAYERS * LINEARS_PER_LAYER - 4  # the unadapted projections stay quantized
        for s in nm.sites():
            w = folded.model.get_parameter(s.name)
            assert type(w) is torch.nn.Parameter and w.dtype == torch.float32
        k = folded.model.get_parameter("model.layers.0.self_attn.k_proj.weight")
        assert k is model.model.layers[0].self_attn.k_proj.weight  # shared, still quantized
        nm.eval()
        with torch.no_grad():
            reference = reference_model(dequantized_model(float_model, model), nm)
            assert rel_diff(call(folded, inputs), call(nm, inputs)) < 1e-5  # materialised vs factorised ΔW
            assert rel_diff(call(folded, inputs), call(reference, inputs)) < 1e-5
    finally:
        for ad in nm.adapters.values():
            ad.reset_parameters(torch.Generator().manual_seed(0))


@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_merge_into(fmt, requantize):
    float_model, model, inputs = build(fmt, seed=3)
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.3, seed=3)
    kind = fmt.removesuffix("-dq")
    with torch.no_grad():
        before = call(nm, inputs)
        reference = call(reference_model(dequantized_model(float_model, model), nm), inputs)
    report = neat_fx.merge_into(model, nm, requantize=requantize, example_inputs=inputs)
    assert isinstance(report, quantized.MergeReport) and report.model is model
    assert [s.name for s in report.sites] == [s.name for s in nm.sites()]
    with torch.no_grad():
        merged = call(quantized.eager_view(model), inputs)
        assert rel_diff(call(nm, inputs), before) == 0.0  # nm keeps its own quantized W0
    for s, entry in zip(nm.sites(), report.sites):
        w = model.get_parameter(s.name)
        assert entry.format == kind and entry.update_max > 0
        if requantize:
            assert quantized.format_of(w) == kind
            # the error reported is the merged weight against its requantization, recomputed here
            w0 = _library_dequantize(nm.base_tensor(s))
            exact = w0.double() + nm.adapters[s.key].delta_weight(w0).double()
            err = (_library_dequantize(w).double() - exact).abs().max()
            assert abs(entry.error_max - float(err)) <= 1e-6 * max(1.0, float(err))
            assert 0 < entry.error_rel < 0.3  # 4-bit codes of these random weights: about 0.2
        else:
            assert type(w) is torch.nn.Parameter and w.dtype == torch.float32 and entry.error_max == 0.0
    assert abs(report.output_max - rel_diff(merged, before) * max(1.0, float(before.logits.abs().max()))) < 1e-6
    if requantize:
        assert report.output_rel > 1e-4  # requantizing changes the function, and the report says by how much
    else:
        assert report.output_rel < 1e-5 and rel_diff(merged, reference) < 1e-5
        if kind.startswith("bnb."):
            assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        again = neat_fx.merge_into(model, nm, requantize=False)  # never counts ΔW twice
        with torch.no_grad():
            assert rel_diff(call(quantized.eager_view(model), inputs), merged) == 0.0
        assert again.model is model


def test_merge_into_a_quantized_base_asks_what_to_do(case):
    _, _, model, _, nm = case
    with pytest.raises(MergeError, match=r"requantize=False.*requantize=True"):
        neat_fx.merge_into(model, nm)


def test_save_load_round_trip_and_other_bases_refused(tmp_path):
    float_model, model, inputs = build("bnb.nf4-dq", seed=4)
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.3, seed=4)
    neat_fx.save_adapters(nm, tmp_path / "a")
    again = neat_fx.load_adapters(model, tmp_path / "a", inputs)
    with torch.no_grad():
        assert rel_diff(call(again.eval(), inputs), call(nm, inputs)) == 0.0
    # onto the float base, and float adapters onto the quantized base: refused, both formats named
    with pytest.raises(AdapterMismatchError, match=r"held bnb\.nf4 \(block 64, double quantization\), this one is"):
        neat_fx.load_adapters(float_model, tmp_path / "a", inputs)
    plain = neat_fx.transform(float_model, PATTERNS, inputs, rank=4, seed=0)
    neat_fx.save_adapters(plain, tmp_path / "b")
    with pytest.raises(AdapterMismatchError, match=r"held unquantized, this one is bnb\.nf4"):
        neat_fx.load_adapters(nm, tmp_path / "b")
    # a base quantized in another format (here without double quantization) is another W0
    other = quantize(copy.deepcopy(float_model), "bnb.nf4")
    with pytest.raises(AdapterMismatchError, match="double quantization"):
        neat_fx.load_adapters(other, tmp_path / "a", inputs)


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")  # PEFT: merge() would need TorchAoConfig
@pytest.mark.parametrize("fmt", ["torchao.nf4", "torchao.int8", "bnb.nf4-dq"])
def test_lora_form_loads_in_peft_on_the_same_quantized_base(fmt, tmp_path):
    peft = pytest.importorskip("peft")
    _, model, inputs = build(fmt, seed=5)
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.3, seed=5)
    neat_fx.save_adapters(nm, tmp_path / "lora", format="lora")
    with torch.no_grad():
        expected = call(nm, inputs)
    lora = peft.PeftModel.from_pretrained(model, tmp_path / "lora")
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is type(
        model.model.layers[1].self_attn.k_proj
    )  # the quantized layer itself, under PEFT's LoRA layer
    # bitsandbytes' CPU fast path (eval, no grad) repacks weights in place: run the PEFT model with grad enabled
    lora.train()
    out = call(lora, inputs)
    assert rel_diff(out, expected) < 1e-4
    lora.unload()


@pytest.mark.parametrize("fmt", ["torchao.nf4", "bnb.nf4-dq"])
def test_generate_on_a_quantized_base(fmt):
    _, model, inputs = build(fmt, seed=6)
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.3, seed=6)
    ids, mask = decoders.left_padded((7, 4), seed=7)
    tokens = neat_fx.generate(nm, ids, attention_mask=mask, max_new_tokens=6)
    assert quantized.format_of(model.model.layers[0].self_attn.q_proj.weight) == fmt.removesuffix("-dq")
    merged = copy.deepcopy(decoders.build("llama", seed=6))
    with torch.no_grad():
        for name, mod in merged.named_modules():
            if _projection(mod, name):
                site = next((s for s in nm.sites() if s.name == name + ".weight"), None)
                w0 = _library_dequantize(model.get_submodule(name).weight)
                mod.weight.copy_(w0 if site is None else nm.adapters[site.key].folded_weight(w0))
    expected = merged.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, expected)


def test_checkpoint_resume_on_a_quantized_base(tmp_path):
    _, model, inputs = build("bnb.nf4", seed=8)
    labels = inputs["input_ids"]
    nm = neat_fx.transform(model, PATTERNS, dict(inputs, labels=labels), rank=4, seed=0).train()
    opt = torch.optim.AdamW(nm.parameters(), lr=1e-2)

    def steps(n):
        for _ in range(n):
            nm(**inputs, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()

    steps(2)
    neat_fx.save_checkpoint(tmp_path / "ck", nm, opt, step=2)
    steps(2)
    after = {k: v.clone() for k, v in nm.adapters.state_dict().items()}
    fresh = neat_fx.transform(model, PATTERNS, dict(inputs, labels=labels), rank=4, seed=1).train()
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert neat_fx.load_checkpoint(tmp_path / "ck", fresh, opt)["step"] == 2
    nm = fresh
    steps(2)
    for k, v in fresh.adapters.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=1e-6, atol=1e-7)


# -- errors ------------------------------------------------------------------------------------------------------
class Packed(torch.Tensor):
    """A weight held in a format neat_fx does not know."""


def test_unknown_format_is_named_with_the_known_ones():
    model = decoders.build("llama")
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach().as_subclass(Packed), requires_grad=False)
    with pytest.raises(PatternError, match=r"Packed.*Formats it knows: torchao NF4Tensor.*exclude="):
        neat_fx.transform(model, PATTERNS, decoders.example_inputs())
    with pytest.raises(PatternError, match="Packed"):
        neat_fx.transform(model, "all-linear", decoders.example_inputs())


def test_a_quantized_weight_cannot_be_trained_in_full(case):
    _, _, model, inputs, _ = case
    with pytest.raises(PatternError, match=r"o_proj\.weight, held quantized .*cannot be trained in full"):
        neat_fx.transform(model, PATTERNS, inputs, trainable=["*layers.0.self_attn.o_proj.weight"])


def test_neat_fx_works_without_the_quantization_libraries(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torchao'] = None; sys.modules['bitsandbytes'] = None\n"
        "import torch, neat_fx\n"
        "from neat_fx import quantized\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "nm = neat_fx.transform(m, ['*'], (torch.ones(2, 4),))\n"
        "print(len(nm.sites()), 'torchao' in sys.modules and sys.modules['torchao'] is not None)\n"
        "quantized._require('bitsandbytes')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["1", "False"], out.stderr[-2000:]
    assert "ImportError" in out.stderr and "pip install 'neat-fx[quantized]'" in out.stderr


# -- 3. merged quantized Hugging Face models: save_pretrained → from_pretrained -------------------------------------
@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("library", ["torchao", "bitsandbytes"])
def test_merged_model_round_trips_through_save_pretrained(library, requantize, tmp_path):
    """A base quantized by transformers at load (TorchAoConfig / BitsAndBytesConfig), merged, saved and loaded
    again: the loaded model is the merged one exactly — requantized layers in the base's format, plain ones plain
    (bitsandbytes: listed in llm_int8_skip_modules so from_pretrained leaves them nn.Linear)."""
    import transformers

    decoders.build("llama", seed=9).save_pretrained(tmp_path / "base")
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        config = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    load = transformers.AutoModelForCausalLM.from_pretrained
    model = load(tmp_path / "base", quantization_config=config)
    kind = "torchao.int8" if library == "torchao" else "bnb.nf4"
    assert quantized.format_of(model.model.layers[0].self_attn.q_proj.weight) == kind
    inputs = decoders.example_inputs()
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.05, seed=9)
    report = neat_fx.merge_into(model, nm, requantize=requantize, example_inputs=inputs)
    model.save_pretrained(tmp_path / "merged")
    loaded = load(tmp_path / "merged")
    q_proj, k_proj = loaded.model.layers[0].self_attn.q_proj, loaded.model.layers[0].self_attn.k_proj
    assert quantized.format_of(k_proj.weight) == kind  # not adapted: as quantized as before
    if requantize:
        assert quantized.format_of(q_proj.weight) == kind
    else:
        assert type(q_proj) is torch.nn.Linear and type(q_proj.weight) is torch.nn.Parameter
    # bitsandbytes' own CPU forward (eval, no grad) repacks in place; its layers are computed as they dequantize
    with torch.no_grad():
        merged = call(quantized.eager_view(model), inputs)
        assert rel_diff(call(quantized.eager_view(loaded), inputs), merged) == 0.0
        if not requantize:
            assert rel_diff(merged, call(nm, inputs)) < 1e-5 and report.output_rel < 1e-5


# -- DDP -------------------------------------------------------------------------------------------------------------
def _dist_run(mode: str, out, nproc: int):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).parent / "quantized_dist_worker.py"
    head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = head + ([] if nproc == 1 else ["--nproc_per_node", str(nproc)]) + [str(worker), mode, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads((out / "result.json").read_text()), load_file(str(out / "adapters.st"))


@pytest.mark.slow  # ≈ 30 s a mode: three interpreters, each capturing the model
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp_blocks"])
def test_distributed_on_an_nf4_base_equals_one_process(mode, tmp_path):
    """2 processes over gloo on halves of the batch = 1 process on the whole batch. DDP: without nm telling DDP to
    leave the quantized weights alone, its broadcast re-quantized them in place and the adapters differed by 3e-4.
    FSDP2, one unit per layer: the NF4 weights themselves are sharded (torchao's NF4 all-gather), each rank holding
    an NF4 shard."""
    single, ref = _dist_run("single", tmp_path / "one", 1)
    res, adapters = _dist_run(mode, tmp_path / "two", 2)
    assert res["world"] == 2 and res["base"] == single["base"] == "torchao.nf4"
    assert res["holder"] == ("DTensor" if mode == "fsdp_blocks" else "NF4Tensor")
    assert max(float((adapters[k] - ref[k]).abs().max()) for k in ref) < 1e-6
    assert max(float(ref[k].abs().max()) for k in ref if k.endswith(".B")) > 0


def test_generate_folds_once_while_the_adapters_do_not_change(monkeypatch):
    """The fold cache keys on the tensors W0 is held in: a quantized base (dequantized afresh at each read) still
    folds once for many calls, and again after an optimizer step."""
    import importlib

    gen = importlib.import_module("neat_fx.generate")
    _, model, inputs = build("torchao.nf4")
    nm = neat_fx.transform(model, PATTERNS, inputs, rank=4, seed=0).eval()
    folds = []
    original = gen.adapted_weights
    monkeypatch.setattr(gen, "adapted_weights", lambda m: folds.append(1) or original(m))
    ids = inputs["input_ids"][:1, -3:]
    for _ in range(3):
        neat_fx.generate(nm, ids, max_new_tokens=2, pad_token_id=0)
    assert len(folds) == 1
    with torch.no_grad():
        next(iter(nm.adapters.values())).B.add_(0.1)  # what an optimizer step does: a new version
    neat_fx.generate(nm, ids, max_new_tokens=2, pad_token_id=0)
    assert len(folds) == 2
