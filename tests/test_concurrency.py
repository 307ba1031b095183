"""Concurrent calls: nothing that runs a model through neat_fx writes to the user's model or to shared module
state while it runs. Threads calling neat_fx.generate while other threads run the base model (its own generate
and forward), threads running the with-past export's wrapper, threads calling an AdapterBank with different
`adapter_names` while another flips `set_adapter`: every call equals the same call made alone (sequential
references computed first), the base model's weights, parameter tables and train/eval mode stay as they were.
Each test fails on the code that swapped attributes (functional_call) or wrote the bank's index for a call."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import neat_fx

import decoders
from helpers import max_diff, randomize_adapters, three_bert_adapters

NEW = 6
CALLS = 6  # per thread


def _run_threads(jobs: list, calls: int = CALLS) -> tuple[int, int, list[str]]:
    """Runs each job (a callable returning True when its result is right) `calls` times in its own thread, all
    started together. Returns (wrong results, calls made, the errors raised)."""
    start = threading.Barrier(len(jobs))
    wrong, made, errors = [0], [0], []
    lock = threading.Lock()

    def loop(job):
        start.wait()
        for _ in range(calls):
            try:
                ok = job()
            except Exception as exc:  # noqa: BLE001 - every failure is counted and named
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                made[0] += 1
                wrong[0] += not ok

    threads = [threading.Thread(target=loop, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wrong[0], made[0], errors


@pytest.fixture(scope="module")
def llama_nm():
    model = decoders.build("llama")
    nm = neat_fx.transform(model, ["*"], decoders.example_inputs(), rank=4, modes=("eval",), seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    return model, nm


def _base_generate(model, ids, mask):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
    )


def test_generate_leaves_the_base_model_to_other_threads(llama_nm):
    """4 threads generate through nm (keep_folded on and off) while 4 run the base model's own generate and
    forward, in train mode (dropout is 0: the mode only matters as state nobody may flip)."""
    model, nm = llama_nm
    model.train()
    ids, mask = decoders.left_padded((7, 4))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tables = {n: dict(m._parameters) for n, m in model.named_modules()}
    with torch.no_grad():
        adapted = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
        base = _base_generate(model, ids, mask)
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(adapted, base)  # the adapters change the tokens: a swapped-in weight would show
    assert model.training

    def through_nm(keep):
        def job():
            out = neat_fx.generate(
                nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, keep_folded=keep
            )
            return torch.equal(out, adapted)

        return job

    def base_generate():
        with torch.no_grad():
            ok = torch.equal(_base_generate(model, ids, mask), base)
        return ok and model.training

    def base_forward():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return max_diff(logits, base_logits) <= 1e-5 * base_logits.abs().max().item() and model.training

    jobs = [through_nm(True), through_nm(False)] * 2 + [base_generate, base_forward] * 2
    wrong, made, errors = _run_threads(jobs)
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]}"
    assert wrong == 0, f"{wrong} of {made} concurrent results differ from the same call made alone"
    model.eval()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())
    assert all(dict(m._parameters) == tables[n] for n, m in model.named_modules())  # the very same tensors


def test_generate_runs_forwards_wrapped_by_accelerate_hooks_on_the_view(llama_nm):
    """accelerate's hooks (device_map dispatch) replace a module's forward by a partial bound to the module: the
    view rebinds it, so the hooked layers compute with W0 + ΔW, and the hooks run (counted)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, nm = llama_nm
    ids, mask = decoders.left_padded((7, 4))
    want = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    seen = []

    class Count(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(module)
            return args, kwargs

    layers = [*model.model.layers, model.lm_head]
    for layer in layers:
        hooks.add_hook_to_module(layer, Count())
    try:
        got = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    finally:
        for layer in layers:
            hooks.remove_hook_from_module(layer)
    assert torch.equal(got, want)
    assert seen and not any(m in layers for m in seen)  # the hooks ran on the view's modules


def test_a_hook_on_the_model_itself_keeps_its_forward_signature():
    """accelerate's `io_same_device` hook on the root (dispatch_model, multi-GPU device_map) wraps the model's
    forward with `update_wrapper`: generate() reads the forward's signature through `__wrapped__` to build
    position ids for left-padded rows. The view keeps it: GPT-2's padded row gives the unhooked tokens."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = decoders.build("gpt2")
    nm = neat_fx.transform(model, ["*"], decoders.example_inputs(), rank=4, modes=("eval",), seed=0)
    randomize_adapters(nm, std=0.3, seed=5)
    ids, mask = decoders.left_padded((7, 4))
    want = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    hooks.add_hook_to_module(model, hooks.ModelHook())
    try:
        got = neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    finally:
        hooks.remove_hook_from_module(model)
    assert torch.equal(got, want)


def test_offloaded_modules_are_refused(llama_nm):
    """An offload hook writes W0 from its store into the module before every call: refused, not silently wrong."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, nm = llama_nm
    ids, mask = decoders.left_padded((7, 4))
    layer = model.model.layers[0]
    hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu", offload=True))
    try:
        with pytest.raises(neat_fx.GenerationError, match="offload"):
            neat_fx.generate(nm, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    finally:
        hooks.remove_hook_from_module(layer)


def test_with_past_wrapper_leaves_the_base_model_to_other_threads(llama_nm):
    """The with-past export's traced wrapper (WithPast) computes W0 + ΔW on its own view: run in threads next
    to the base model's forward, each equals its reference, and it equals the merged model's logits."""
    from neat_fx.export import decoder
    from neat_fx.generate import adapted_weights

    model, nm = llama_nm
    ids, mask = decoders.left_padded((7, 4))
    weights = adapted_weights(nm)
    layout = decoder.probe_layout(model, weights, ids)
    wrapper = decoder.WithPast(model, weights, layout).eval()
    positions = decoder.positions(mask, ids.shape[1])
    args = (ids, mask, positions, *layout.empty_past(2, 0)) if layout.position_ids else (ids, mask)
    merged = neat_fx.merge_into(copy.deepcopy(model), nm)
    with torch.no_grad():
        want = wrapper(*args)[0]
        base = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ref = merged(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_diff(want, ref) <= 1e-5 * ref.abs().max().item()
    assert max_diff(want, base) > 1e-2 * base.abs().max().item()

    def adapted_job():
        with torch.no_grad():
            return max_diff(wrapper(*args)[0], want) <= 1e-5 * want.abs().max().item()

    def base_job():
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return max_diff(got, base) <= 1e-5 * base.abs().max().item()

    wrong, made, errors = _run_threads([adapted_job, base_job] * 4, calls=10)
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]}"
    assert wrong == 0, f"{wrong} of {made} concurrent results differ from the same call made alone"


@pytest.fixture(scope="module")
def bank_and_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, example, other, modules = three_bert_adapters(root)
    bank = neat_fx.serve(model, {n: root / n for n in modules}, example, active="a")
    return bank, other, modules


PATTERNS = [
    ["a", "b", "c", "a", "b", "c"],
    ["c", "c", "b", "b", "a", "a"],
    ["b", "a", "a", "c", "c", "b"],
    ["a"] * 6,
    ["c"] * 6,
    ["b", "b", "b", "c", "b", "b"],
]


def test_mixed_batches_in_threads_each_equal_the_call_alone(bank_and_modules):
    """6 threads call the bank with different adapter_names (mixed, and one adapter for every row) while a 7th
    flips set_adapter: each result equals the same call made alone, and equals each row's own adapter."""
    bank, other, modules = bank_and_modules
    batch = {k: torch.cat([v, v], 0) for k, v in other.items()}  # 6 rows
    with torch.no_grad():
        alone = [bank(**batch, adapter_names=p).logits for p in PATTERNS]
        own = {n: nm(**batch).logits for n, nm in modules.items()}
    for names, out in zip(PATTERNS, alone):  # the references are right: row i is adapter names[i]'s
        for i, n in enumerate(names):
            assert max_diff(out[i], own[n][i]) <= 1e-5 * own[n][i].abs().max().item()
    assert bank.active == "a"

    def mixed(i):
        def job():
            with torch.no_grad():
                got = bank(**batch, adapter_names=PATTERNS[i]).logits
            return max_diff(got, alone[i]) <= 1e-6 * alone[i].abs().max().item()

        return job

    def switch():
        for name in ("b", "c", "a"):
            bank.set_adapter(name)
        return True

    wrong, made, errors = _run_threads([mixed(i) for i in range(len(PATTERNS))] + [switch], calls=10)
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]}"
    assert wrong == 0, f"{wrong} of {made} concurrent results differ from the same call made alone"
    assert bank.active == "a"  # the last switch; no mixed call changed it


def test_set_adapter_does_not_reach_a_call_with_adapter_names(bank_and_modules):
    """One global switch, as in PEFT: a call without adapter_names follows it, one with adapter_names never."""
    bank, other, modules = bank_and_modules
    with torch.no_grad():
        want = modules["b"](**other).logits
        for active in ("a", "c"):
            bank.set_adapter(active)
            got = bank(**other, adapter_names=["b"] * other["input_ids"].shape[0]).logits
            assert max_diff(got, want) <= 1e-5 * want.abs().max().item()
            plain = bank(**other).logits
            assert max_diff(plain, modules[active](**other).logits) <= 1e-5 * want.abs().max().item()
    bank.set_adapter("a")
