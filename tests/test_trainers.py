"""NEAT in the LLM training stack: `neat_fx.hf.wrap(nm)` inside transformers' Trainer (default arguments) and TRL's
SFT / DPO / GRPO trainers, on the tiny LLaMA of tests/lm_fixture.py (random weights, character tokenizer).

Each trainer: the loss falls (or the adapters move, for the policy-gradient ones), `save_model()` writes adapters
that `neat_fx.read_adapters` reads back equal to nm's, and the numbers the trainer computes through the wrapper equal
nm's captured graph (the reference). The wrapper itself: the same function as nm, the base model exactly with the
adapters off, nothing of the user's model written."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neat_fx

import lm_fixture as F
from helpers import randomize_adapters

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import neat_fx.hf as H  # noqa: E402  (after the importorskip: needs transformers)

WORKER = Path(__file__).parent / "trainers_worker.py"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make(seed=0, patterns="all-linear", build=F.make_model, **options):
    tok = F.make_tokenizer()
    model = build(tok, seed=seed)
    model.config.use_cache = False  # captured without a KV cache (generate brings it back)
    example = dict(tok(["12+7=19", "3+4=7"], padding=True, return_tensors="pt"))
    nm = neat_fx.transform(model, patterns, example_inputs=example, rank=4, seed=0, **options)
    return tok, model, nm


def batch(tok, texts):
    b = dict(tok(texts, padding=True, return_tensors="pt"))
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def nll(logits, labels, n=None):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (n if n is not None else (labels != -100).sum())


def saved_equal(folder, nm):
    loaded = neat_fx.read_adapters(folder)
    ours = {s.name: nm.adapters[s.key] for s in nm.site_infos}
    assert set(loaded.sites) == set(ours)
    for name, ad in ours.items():
        assert torch.equal(loaded.sites[name]["A"], ad.A.detach())
        assert torch.equal(loaded.sites[name]["B"], ad.B.detach())


def args_common(tmp_path, **over):
    return dict(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, seed=0, disable_tqdm=True, **over)


# -- the wrapper ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2_tied_head", "trained_head"])
def test_wrap_computes_nm_and_the_base_with_adapters_off(family):
    if family == "qwen2_tied_head":  # the head is tied to the embedding: the head adapted, the embedding keeps W0
        tok, model, nm = make(build=F.make_qwen2, patterns=["*q_proj", "*down_proj", "lm_head"])
        assert any(s.shared_with_other_ops for s in nm.site_infos)
    elif family == "trained_head":
        tok, model, nm = make(trainable=["lm_head*"])
        with torch.no_grad():
            next(iter(nm.trainable.values())).add_(0.05)
    else:
        tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    ids = batch(tok, ["1+2=3", "45+10=55", "7+7=14"])
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    types_before = [type(m) for m in model.modules()]
    wrapped = H.wrap(nm).eval()
    graph = nm(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    eager = wrapped(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    base = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], use_cache=False).logits
    assert (eager - graph).abs().max() < 1e-5  # the same function as the captured graph
    assert (eager - base).abs().max() > 1e-2  # the adapters do something
    with wrapped.disable_adapters():
        off = wrapped(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert torch.equal(off, base)  # the base model, exactly
    # a gradient reaches every adapter (and the head trained in full) through the eager code
    wrapped.train()
    wrapped(**ids).loss.backward()
    trained = [p for p in nm.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained if p.dim() == 2)
    # the user's model is as it was: its classes, its hooks, no gradient on its frozen weights
    wrapped.enable_input_require_grads()  # registers a hook: on the wrapper's view, not on the model
    wrapped.enable_input_require_grads()  # once, however often trainers ask
    assert len(wrapped.get_input_embeddings()._forward_hooks) == 1
    assert [type(m) for m in model.modules()] == types_before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert all(p.grad is None for p in model.parameters())


def test_wrap_has_what_trainers_look_for(capsys):
    tok, model, nm = make()
    wrapped = H.wrap(nm)
    assert wrapped.config.to_dict() == model.config.to_dict() and wrapped.config is not model.config
    assert wrapped.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert wrapped.main_input_name == "input_ids" and wrapped.can_generate()
    assert type(wrapped).__name__ == "NeatLlamaForCausalLM"
    # the model's forward signature: the Trainer keeps exactly these columns and finds the labels
    params = list(inspect.signature(wrapped.forward).parameters)
    assert params[:3] == ["input_ids", "attention_mask", "position_ids"] and "labels" in params
    assert transformers.utils.find_labels(type(wrapped)) == ["labels"]
    assert wrapped.get_input_embeddings().weight is model.get_input_embeddings().weight  # shared, not copied
    assert wrapped.get_input_embeddings() is not model.get_input_embeddings()  # its own module (own hooks)
    # state: nm's trained tensors by our format's names, and nothing of the base
    keys = set(wrapped.state_dict())
    assert keys == {f"{s.name}.neat_{p}" for s in nm.site_infos for p in ("A", "B")}
    trainable, total = nm.parameter_counts()
    wrapped.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )
    assert {id(p) for p in wrapped.parameters() if p.requires_grad} == {id(p) for p in nm.adapters.parameters()}
    assert all(m.config is wrapped.config for m in wrapped.model.modules() if "config" in m.__dict__)
    with pytest.raises(neat_fx.ConfigError, match="wrap takes a NeatModule"):
        H.wrap(model)
    with pytest.raises(neat_fx.ConfigError, match="state does not fit"):
        wrapped.load_state_dict({"nope": torch.zeros(1)})


def test_adapters_off_in_one_thread_only():
    import threading

    tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    wrapped = H.wrap(nm).eval()
    ids = batch(tok, ["1+2=3"])
    on = wrapped(input_ids=ids["input_ids"]).logits
    seen, go = {}, threading.Event()

    def other():
        go.wait()
        seen["logits"] = wrapped(input_ids=ids["input_ids"]).logits

    t = threading.Thread(target=other)
    t.start()
    with wrapped.disable_adapters():
        go.set()
        t.join()
        off = wrapped(input_ids=ids["input_ids"]).logits
    assert torch.equal(seen["logits"], on) and not torch.equal(off, on)


def test_generate_follows_the_adapters_and_is_the_base_when_off():
    tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    wrapped = H.wrap(nm)
    ids = batch(tok, ["12+3="])["input_ids"]
    ours = wrapped.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, neat_fx.generate(nm, ids, max_new_tokens=6))
    with wrapped.disable_adapters():
        off = wrapped.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(off, model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


# -- transformers.Trainer with its defaults --------------------------------------------------------------
def lm_rows(tok, n, seed):
    texts = [r["prompt"] + r["completion"] for r in F.addition(n, seed)]
    enc = tok(texts, padding="max_length", max_length=10)
    return [
        dict(input_ids=i, attention_mask=a, labels=[t if m else -100 for t, m in zip(i, a)], text=s)
        for i, a, s in zip(enc["input_ids"], enc["attention_mask"], texts)
    ]


def test_trainer_with_default_arguments_trains_saves_and_resumes(tmp_path):
    tok, model, nm = make()
    rows = lm_rows(tok, 64, 0)  # a "text" column the Trainer must drop (remove_unused_columns, by the signature)
    data = datasets.Dataset.from_list(rows)

    def trainer(nm, out, **over):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, save_steps=3,
            report_to="none", use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1, **over,
        )  # fmt: skip
        return transformers.Trainer(model=H.wrap(nm), args=args, train_dataset=data)

    t = trainer(nm, tmp_path / "a")
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    t.save_model(str(tmp_path / "final"))
    saved_equal(tmp_path / "final", nm)
    assert (tmp_path / "final" / "README.md").read_text().count("neat") > 0  # the model card
    # resume from the step-3 checkpoint: the same adapters as the uninterrupted run
    _, _, nm2 = make()
    trainer(nm2, tmp_path / "a").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for s in nm.site_infos:
        for p, q in zip(nm.adapters[s.key].parameters(), nm2.adapters[s.key].parameters()):
            assert (p - q).abs().max() < 1e-6


# -- TRL --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "packing", "completion_only"])
def test_sft_trainer(tmp_path, mode):
    tok, model, nm = make()
    rows = F.addition(64, 0)
    if mode != "completion_only":
        rows = [dict(text=r["prompt"] + r["completion"]) for r in rows]
    config = trl.SFTConfig(
        **args_common(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=1,
        packing=mode == "packing", max_length=32, bf16=False, save_strategy="no",
    )  # fmt: skip
    wrapped = H.wrap(nm)
    trainer = trl.SFTTrainer(
        model=wrapped, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    # the loss TRL computes through the wrapper (its fused LM head) equals nm's captured graph on the same batch
    b = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    if mode == "packing":
        assert "position_ids" in b and b["input_ids"].shape[0] == 1  # several rows in one, positions restart
    else:
        masked = (b["labels"] == -100) & (b["attention_mask"] == 1)
        assert bool(masked.any()) == (mode == "completion_only")  # the prompt is out of the loss
        wrapped.eval()
        fused = wrapped(**b, fused_lm_head=True, use_cache=False).loss
        graph = nll(nm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        assert abs(float(fused.detach()) - float(graph.detach())) < 1e-5
        wrapped.train()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    trainer.save_model(str(tmp_path / "saved"))
    saved_equal(tmp_path / "saved", nm)


def test_dpo_with_a_reference_that_costs_no_copy(tmp_path):
    tok, model, nm = make()
    wrapped = H.wrap(nm)
    ref = H.reference_model(nm)
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in ref.parameters())  # every tensor is the model's
    assert ref is not model and ref.training is False
    rows = [
        dict(prompt=r["prompt"], chosen=r["completion"], rejected=str(int(r["completion"]) + 1))
        for r in F.addition(32, 0)
    ]
    config = trl.DPOConfig(
        **args_common(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=1,
        save_strategy="no", bf16=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=wrapped, ref_model=ref, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert abs(logs[0]["loss"] - 0.6931) < 1e-3  # B = 0: the policy is the reference, loss = log 2
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] and logs[-1]["loss"] < logs[0]["loss"]
    # the reference stayed the base model: equal to the policy with its adapters off, and to the model
    ids = batch(tok, ["12+7=19"])
    ref_logits = ref(input_ids=ids["input_ids"], use_cache=False).logits
    with wrapped.disable_adapters():
        off = wrapped(input_ids=ids["input_ids"], use_cache=False).logits
    assert torch.equal(ref_logits, off)
    assert torch.equal(ref_logits, model(input_ids=ids["input_ids"], use_cache=False).logits)
    trainer.save_model(str(tmp_path / "saved"))
    saved_equal(tmp_path / "saved", nm)


def test_grpo_generates_through_neat(tmp_path, monkeypatch):
    tok, model, nm = make()
    folds = []
    original = H.cached_adapted_weights
    monkeypatch.setattr(H, "cached_adapted_weights", lambda m: folds.append(1) or original(m))

    def reward(completions, **_):  # sums that start with the right digit
        return [float(c.strip()[:1] == "1") for c in completions]

    config = trl.GRPOConfig(
        **args_common(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, learning_rate=2e-2, logging_steps=1, save_strategy="no", bf16=False,
    )  # fmt: skip
    prompts = datasets.Dataset.from_list([dict(prompt=r["prompt"]) for r in F.addition(16, 1)])
    before = [p.detach().clone() for p in nm.adapters.parameters()]
    trainer = trl.GRPOTrainer(
        model=H.wrap(nm), reward_funcs=reward, args=config, train_dataset=prompts, processing_class=tok
    )
    trainer.train()
    assert len(folds) >= 3  # every step generated through the wrapper's generate (W0 + ΔW folded)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, nm.adapters.parameters())]
    assert any(moved)
    trainer.save_model(str(tmp_path / "saved"))
    saved_equal(tmp_path / "saved", nm)


def test_sft_two_processes_equals_one(tmp_path):
    """Accelerate / torchrun: the SFT run with 2 processes (gloo, 4 rows each) equals 1 process on the same global
    batch of 8 rows (SGD, float32), adapters within 1e-5 after 3 steps."""
    from safetensors.torch import load_file

    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if n == 2 else []
        r = subprocess.run(
            [sys.executable, *launch, str(WORKER), str(out)], capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        runs[n] = load_file(str(out / "adapters" / "adapters.safetensors"))
    one, two = runs[1], runs[2]
    moved = max(float(one[k].abs().max()) for k in one if k.endswith("neat_B"))
    assert moved > 1e-3  # trained
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    wrapped = H.wrap(nm).train()
    ids = batch(tok, ["1+2=3", "45+10=55"])

    def grads():
        for p in nm.adapters.parameters():
            p.grad = None
        wrapped(**ids).loss.backward()
        return [p.grad.clone() for p in nm.adapters.parameters()]

    calls = []
    wrapped.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the layer
    plain = grads()
    assert len(calls) == 1
    for reentrant in (False, True):
        wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert wrapped.is_gradient_checkpointing
        calls.clear()
        checkpointed = grads()
        assert len(calls) == 2  # the layer ran again in the backward pass
        assert max(float((a - b).abs().max()) for a, b in zip(plain, checkpointed)) < 1e-6
        wrapped.gradient_checkpointing_disable()
    # the flags were set on the wrapper's view of the layers, not on the model's own
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _family(name):
    import decoders
    import zoo

    if name in decoders.DECODERS:
        return decoders.build(name), decoders.example_inputs(), "all-linear", {}
    if name == "bert_classifier":
        model, example, _, _ = zoo.bert()
        return model.eval(), example, "all-linear", dict(trainable=["classifier*"])
    if name == "t5":
        model, example, _, patterns = zoo.t5()
        return model.eval(), example, patterns, {}
    import test_experts

    return test_experts.qwen3_moe("batched_mm"), dict(input_ids=test_experts._inputs(0)), "all-linear", {}


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "mistral", "gpt2", "phi3", "gemma2", "bert_classifier", "t5", "qwen3_moe"]
)
def test_wrap_equals_the_graph_on_every_family(name):
    """Conv1D (GPT-2), fused qkv (Phi-3), soft-capping (Gemma-2), a classifier trained in full (BERT), an
    encoder-decoder (T5) and 3-D expert stacks (Qwen3-MoE: the weight read as a property)."""
    model, example, patterns, options = _family(name)
    nm = neat_fx.transform(model, patterns, example_inputs=example, rank=4, seed=0, **options).eval()
    randomize_adapters(nm, std=0.2)
    wrapped = H.wrap(nm).eval()

    def logits(out):
        return out.logits if hasattr(out, "logits") else out[0]

    graph, eager, base = logits(nm(**example)), logits(wrapped(**example)), logits(model(**example))
    assert (eager - graph).abs().max() < 1e-5 and (eager - base).abs().max() > 1e-2
    with wrapped.disable_adapters():
        assert torch.equal(logits(wrapped(**example)), base)


def test_trainer_defaults_on_a_classifier(tmp_path):
    import zoo

    model, _, _, _ = zoo.bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (48, 10), generator=g)
    rows = [dict(input_ids=i.tolist(), attention_mask=[1] * 10, labels=int(i[0] > 60), sentence="unused") for i in ids]
    example = dict(input_ids=ids[:4], attention_mask=torch.ones(4, 10, dtype=torch.long))
    nm = neat_fx.transform(model, ["*query", "*value"], example_inputs=example, rank=4, trainable=["classifier*"])
    args = transformers.TrainingArguments(**args_common(tmp_path), max_steps=12, learning_rate=1e-2, logging_steps=4)
    trainer = transformers.Trainer(model=H.wrap(nm), args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    loaded = neat_fx.read_adapters(tmp_path / "saved")
    head = nm.trainable_names
    assert set(loaded.trainable) == set(head.values())
    for key, name in head.items():
        assert torch.equal(loaded.trainable[name], nm.trainable[key].detach())


def test_merge_and_unload_writes_the_adapted_weights_into_the_model():
    tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    wrapped = H.wrap(nm).eval()
    ids = batch(tok, ["1+2=3", "45+10=55"])
    before = wrapped(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    merged = wrapped.merge_and_unload()
    assert merged is model
    after = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert (after - before).abs().max() < 1e-4
    # nm (and so the wrapper) keeps its own W0: the same function after the merge, not W0 + 2ΔW
    again = wrapped(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert (again - before).abs().max() < 1e-5


def test_nm_itself_disables_its_adapters_for_this_thread():
    tok, model, nm = make(trainable=["lm_head*"])
    randomize_adapters(nm, std=0.3)
    with torch.no_grad():
        next(iter(nm.trainable.values())).add_(0.05)
    nm.eval()
    ids = batch(tok, ["1+2=3", "45+10=55"])
    inputs = dict(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    base = model(**inputs).logits
    adapted = nm(**inputs).logits
    with nm.disable_adapters():
        assert torch.equal(nm(**inputs).logits, base)
        assert torch.equal(H.wrap(nm)(**inputs).logits, base)  # one switch for nm and its wrappers
    assert torch.equal(nm(**inputs).logits, adapted)
    # after merge_into wrote W0 + ΔW into the model, "off" is still nm's W0, not the merged model
    tok, model, nm = make()
    randomize_adapters(nm, std=0.3)
    base = model.eval()(**inputs).logits
    neat_fx.merge_into(model, nm)
    assert (model(**inputs).logits - base).abs().max() > 1e-2
    with nm.eval().disable_adapters():
        assert (nm(**inputs).logits - base).abs().max() < 1e-6


@pytest.mark.parametrize("fmt", ["torchao.nf4", "torchao.int8", "bnb.nf4", "bnb.nf4-dq"])
def test_wrap_on_a_quantized_base(fmt, tmp_path):
    """QLoRA-style: wrap(nm) on a 4-/8-bit base equals nm's graph, keeps the base quantized, and trains in SFT."""
    pytest.importorskip("torchao" if fmt.startswith("torchao") else "bitsandbytes")
    import test_quantized as Q

    from neat_fx import quantized

    _, model, example = Q.build(fmt)
    nm = neat_fx.transform(model, Q.PATTERNS, example, rank=4, seed=0).eval()
    randomize_adapters(nm, std=0.2)
    wrapped = H.wrap(nm).eval()
    graph, eager = nm(**example).logits, wrapped(**example).logits
    assert (eager - graph).abs().max() < 1e-4 * max(1.0, float(graph.abs().max()))
    with wrapped.disable_adapters():
        off = wrapped(**example).logits
    with nm.disable_adapters():
        assert torch.equal(nm(**example).logits, off)
    base = quantized.eager_view(model)(**example).logits  # the quantized base as QLoRA computes it
    assert (off - base).abs().max() < 1e-4 * max(1.0, float(base.abs().max()))
    # generation through the folded W0_deq + ΔW equals neat_fx.generate; the base stays quantized
    ids = example["input_ids"][:1, -4:]
    assert torch.equal(
        wrapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
        neat_fx.generate(nm, ids, max_new_tokens=4, pad_token_id=0),
    )
    # SFT through TRL on the quantized base: the loss falls, the base weights stay quantized and unchanged
    tok = F.make_tokenizer()
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.reset_parameters(torch.Generator().manual_seed(0))
    rows = [dict(text=r["prompt"] + r["completion"]) for r in F.addition(32, 0)]
    config = trl.SFTConfig(
        **args_common(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=1,
        bf16=False, save_strategy="no", max_length=16,
    )  # fmt: skip
    weights = {n: quantized.format_of(p) for n, p in model.named_parameters() if quantized.format_of(p)}
    trainer = trl.SFTTrainer(
        model=H.wrap(nm), args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert {n: quantized.format_of(p) for n, p in model.named_parameters() if quantized.format_of(p)} == weights
