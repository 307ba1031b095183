"""Routed MoE experts (transformers ≥ 5's 3-D expert stacks) as NEAT sites: one adapter per expert.

Tiny random Qwen3-MoE / GPT-OSS decoders (hidden 32, 4 experts, top-2, 2 layers) with experts_implementation
"batched_mm" (index by expert ids + bmm) and "grouped_mm" (transformers' grouped_mm op with offsets; the CPU build
of torch has `torch._grouped_mm`, and the capture records transformers' `grouped_mm_fallback`). Numbers are checked
against the eager model with W0 + ΔW written into a copy (ΔW per expert from tests/helpers.ref_delta, float64),
on fresh inputs whose routes differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neat_fx
from neat_fx.errors import AdapterMismatchError, PatternError
from neat_fx.experts import ExpertsAdapter

from helpers import op_counts, randomize_adapters, ref_delta, rel_diff

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, EXPERTS, TOP_K = 32, 8, 4, 2
EXPERT_PATTERNS = ["*experts.gate_up_proj", "*experts.down_proj"]


def _common(impl):
    return dict(
        vocab_size=96,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        use_cache=False,
        pad_token_id=0,
        initializer_range=0.2,
        experts_implementation=impl,
    )


def qwen3_moe(impl):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        **_common(impl), moe_intermediate_size=INTER, intermediate_size=64, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, norm_topk_prob=True,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def gpt_oss(impl):
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        **_common(impl), intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K
    )
    return transformers.GptOssForCausalLM(cfg).eval()  # stacks stored (E, d_in, d_out), with biases


def _inputs(seed, batch=3, length=9):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


EXAMPLE = {"input_ids": _inputs(0, 2, 7)}


def reference(model, nm):
    """A copy of `model` with W0 + ΔW written into every adapted stack, ΔW_e per expert from ref_delta (float64,
    no neat_fx code), in the layout the site's ops read."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for s in nm.sites():
            ad = nm.adapters[s.key]
            w = model.get_parameter(s.name)
            for e in range(s.experts):
                w_e = w[e] if s.layout == "out_in" else w[e].t()
                d = ref_delta(w_e, ad.A[e], ad.B[e], [t[e] for t in ad.encoders], [t[e] for t in ad.decoders],
                              ad.activation, ad.scale)  # fmt: skip
                d = d if s.layout == "out_in" else d.t()
                ref.get_parameter(s.name)[e].copy_((w[e].double() + d).to(w.dtype))
    return ref


def routes(model, ids) -> list[torch.Tensor]:
    """Per layer, the experts (tokens, top-k) the model's own router (eager) sends the tokens of `ids` to."""
    hit = []
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(lambda m, args: hit.append(args[1].sort(-1).values))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return hit


@pytest.fixture(scope="module", params=["batched_mm", "grouped_mm"])
def moe(request):
    """(implementation, model, NeatModule over the expert stacks, rank 4, depth 4: r×r layers per expert too)."""
    impl = request.param
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    model = qwen3_moe(impl)
    nm = neat_fx.transform(model, EXPERT_PATTERNS, EXAMPLE, rank=4, depth=4, seed=0)
    randomize_adapters(nm, std=0.3)
    return impl, model, nm


def test_sites_found_and_counted(moe):
    impl, model, nm = moe
    sites = {s.name: s for s in neat_fx.sites(nm)}
    assert sorted(sites) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")
    )
    kind = "bmm" if impl == "batched_mm" else "grouped_mm"
    for name, s in sites.items():
        assert s.experts == EXPERTS and s.kinds == f"{kind} ({EXPERTS} experts)" and s.layout == "out_in"
        # per expert, from how the op reads the stack: gate_up (E, 2I, H): H → 2I; down (E, H, I): I → H
        assert (s.d_in, s.d_out) == ((HIDDEN, 2 * INTER) if name.endswith("gate_up_proj") else (INTER, HIDDEN))
        assert s.uses == 2  # one op per mode (train, eval)
        ad = nm.adapters[s.key]
        assert isinstance(ad, ExpertsAdapter) and ad.A.shape == (EXPERTS, s.d_out, 4)
        assert ad.encoders[0].shape == (EXPERTS, 4, 4)
    # graph structure: one adapter call per stack, the op run twice more on its factors
    plain = neat_fx.fold(nm).graph("eval")
    counts, base = op_counts(nm.graph("eval"), include_modules=True), op_counts(plain, include_modules=True)
    op = "aten.bmm.default" if impl == "batched_mm" else "transformers.grouped_mm_fallback.default"
    assert counts[op] == 3 * base[op] == 3 * 4
    assert sum(v for k, v in counts.items() if k.startswith("adapters.")) == 4
    assert not any(k.startswith("adapters.") for k in base)
    summary = nm.summary()
    assert f"{kind} ({EXPERTS} experts)" in summary and "4 sites" in summary


def test_numbers_match_eager_reference_on_inputs_with_other_routes(moe):
    impl, model, nm = moe
    ref = reference(model, nm)
    nm.eval()
    seen = []
    for seed in (1, 2, 3):
        ids = _inputs(seed, batch=3, length=6)
        seen.append(routes(ref, ids))
        with torch.no_grad():
            out, want, base = nm(input_ids=ids).logits, ref(input_ids=ids).logits, model(input_ids=ids).logits
        assert rel_diff(out, want) <= 1e-5
        assert rel_diff(base, want) > 1e-2  # the adapters do change the function
    # fresh inputs changed the routes, and every expert was used by some input
    for layer in (0, 1):
        assert not torch.equal(seen[0][layer], seen[1][layer]) and not torch.equal(seen[1][layer], seen[2][layer])
        assert set(torch.cat([r[layer] for r in seen]).flatten().tolist()) == set(range(EXPERTS))


def test_gradients_reach_only_the_routed_experts(moe):
    impl, model, nm = moe
    ref = reference(model, nm)
    # two tokens route to at most 4 experts per layer: find inputs that leave one out in both layers
    for seed in range(100):
        ids = _inputs(100 + seed, 2, 2)
        used = [set(r.flatten().tolist()) for r in routes(ref, ids)]
        if all(len(u) < EXPERTS for u in used):
            break
    else:
        pytest.fail("no two-token input left an expert unrouted in both layers")
    nm.train()
    nm.zero_grad()
    nm(input_ids=ids).logits.square().mean().backward()
    for s in nm.sites():
        layer = int(s.name.split(".")[2])
        ad = nm.adapters[s.key]
        for e in range(EXPERTS):
            grads = [ad.A.grad[e], ad.B.grad[e], *(t.grad[e] for t in [*ad.encoders, *ad.decoders])]
            if e in used[layer]:
                assert float(ad.A.grad[e].abs().sum()) > 0 and float(ad.B.grad[e].abs().sum()) > 0, (s.name, e)
            else:
                assert all(float(g.abs().sum()) == 0 for g in grads), (s.name, e)
    assert all(p.grad is None for p in model.parameters())  # the base stays frozen
    nm.eval()


def test_fold_and_merge_write_the_3d_stacks(moe):
    impl, model, nm = moe
    nm.eval()
    ids = _inputs(7, 3, 8)
    ref = reference(model, nm)
    with torch.no_grad():
        want = nm(input_ids=ids).logits
        folded = neat_fx.fold(nm)
        assert rel_diff(folded(input_ids=ids).logits, want) <= 1e-5
        assert rel_diff(ref(input_ids=ids).logits, want) <= 1e-5
        merged = neat_fx.merge_into(copy.deepcopy(model), nm)
        for s in nm.sites():
            assert torch.allclose(merged.get_parameter(s.name), ref.get_parameter(s.name), atol=1e-6)
            assert torch.equal(folded.get_parameter("model." + s.name), merged.get_parameter(s.name))
        assert rel_diff(merged(input_ids=ids).logits, want) <= 1e-5
        # merging into the shared model twice never counts ΔW twice, and nm goes on computing the same function
        shared = copy.deepcopy(model)
        nm2 = neat_fx.transform(shared, EXPERT_PATTERNS, EXAMPLE, rank=4, depth=4, modes=("eval",))
        nm2.adapters.load_state_dict(nm.adapters.state_dict())
        neat_fx.merge_into(shared, nm2)
        neat_fx.merge_into(shared, nm2)
        assert rel_diff(shared(input_ids=ids).logits, want) <= 1e-5
        assert rel_diff(nm2(input_ids=ids).logits, want) <= 1e-5


def test_save_load_round_trip_and_peft_formats_refused(moe, tmp_path):
    impl, model, nm = moe
    nm.eval()
    neat_fx.save_adapters(nm, tmp_path / "a")
    loaded = neat_fx.read_adapters(tmp_path / "a")
    name = "model.layers.1.mlp.experts.down_proj"
    assert loaded.site_meta[name]["experts"] == EXPERTS
    assert loaded.sites[name]["A"].shape == (EXPERTS, HIDDEN, 4)
    fresh = copy.deepcopy(model)
    nm2 = neat_fx.load_adapters(fresh, tmp_path / "a", EXAMPLE, modes=("eval",))
    ids = _inputs(8, 2, 6)
    with torch.no_grad():
        assert torch.equal(nm2(input_ids=ids).logits, nm(input_ids=ids).logits)
    for fmt in ("peft", "lora"):
        with pytest.raises(AdapterMismatchError, match="routed-expert stacks.*target_parameters"):
            neat_fx.save_adapters(nm, tmp_path / fmt, format=fmt)
    # consumers that find sites through the 2-D op table refuse saved expert adapters instead of leaving them out
    with pytest.raises(AdapterMismatchError, match="compile backend.*routed-expert"):
        neat_fx.backend(adapters=tmp_path / "a")
    with pytest.raises(AdapterMismatchError, match="serve.*routed-expert"):
        neat_fx.serve(model, {"a": tmp_path / "a"}, EXAMPLE)


def test_gpt_oss_stacks_stored_in_out_with_biases():
    """GPT-OSS stores (E, d_in, d_out) and reads it as x @ W[ids] (batched_mm): the layout comes from the op."""
    model = gpt_oss("batched_mm")
    nm = neat_fx.transform(model, ["*experts.gate_up_proj", "*experts.down_proj"], EXAMPLE, rank=4, modes=("eval",))
    sites = {s.name.rsplit(".", 1)[1]: s for s in neat_fx.sites(nm) if s.name.startswith("model.layers.0")}
    assert {k: (s.layout, s.d_in, s.d_out) for k, s in sites.items()} == {
        "gate_up_proj": ("in_out", HIDDEN, 2 * INTER),
        "down_proj": ("in_out", INTER, HIDDEN),
    }
    randomize_adapters(nm, std=0.3)
    ref = reference(model, nm)
    for seed in (4, 5):
        ids = _inputs(seed)
        with torch.no_grad():
            assert rel_diff(nm(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5
    with torch.no_grad():
        assert rel_diff(neat_fx.fold(nm)(input_ids=ids).logits, ref(input_ids=ids).logits) <= 1e-5


def test_patterns_all_linear_and_errors():
    model = qwen3_moe("batched_mm")
    nm = neat_fx.transform(model, ["all-linear"], EXAMPLE, rank=2, modes=("eval",))
    names = [s.name for s in neat_fx.sites(nm)]
    # PEFT's all-linear: 2-D linear weights (attention, router) but not the expert stacks, nor the head
    assert names and not any("experts" in n for n in names) and "lm_head.weight" not in names
    assert any(n.endswith("mlp.gate.weight") for n in names)
    everything = neat_fx.transform(model, ["*"], EXAMPLE, rank=2, modes=("eval",))
    assert sum(s.experts > 0 for s in neat_fx.sites(everything)) == 4  # a glob names them like any weight
    with pytest.raises(PatternError) as err:  # error messages list the stacks among the candidates
        neat_fx.transform(model, ["*no_such_weight"], EXAMPLE, modes=("eval",))
    assert f"model.layers.0.mlp.experts.gate_up_proj ({EXPERTS} experts)" in str(err.value)


def test_experts_pattern_on_a_dense_model_names_what_exists():
    import decoders

    model = decoders.llama().eval()
    with pytest.raises(PatternError, match="no routed-experts stacks.*Candidates: .*q_proj"):
        neat_fx.transform(model, ["*experts.gate_up_proj"], EXAMPLE, modes=("eval",))


def test_a_3d_parameter_no_expert_op_reads_is_explained():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Parameter(torch.randn(EXPERTS, 6, 5))
            self.proj = nn.Linear(5, 5)

        def forward(self, x):
            return self.proj(x) + torch.einsum("eoi,ti->to", self.stack, x).sum(-1, keepdim=True)

    with pytest.raises(PatternError, match=r"stack is 3-D \(4, 6, 5\) but read by einsum.*per-expert matmul"):
        neat_fx.transform(Odd(), ["stack"], (torch.randn(3, 5),), modes=("eval",))


def test_blocks_keep_the_expert_update_with_its_layer(moe):
    """Activation checkpointing cuts the graph into layers by nn_module_stack: the expert update goes with its op."""
    impl, model, nm = moe
    nm2 = neat_fx.transform(model, EXPERT_PATTERNS, EXAMPLE, rank=4, depth=4, checkpoint=True)
    nm2.adapters.load_state_dict(nm.adapters.state_dict())
    ids = _inputs(9)
    nm.train(), nm2.train()
    nm.zero_grad()
    a, b = nm(input_ids=ids).logits, nm2(input_ids=ids).logits
    a.square().mean().backward()
    b.square().mean().backward()
    assert rel_diff(b.detach(), a.detach()) <= 1e-6
    for p, q in zip(nm.adapters.parameters(), nm2.adapters.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    nm.eval()


def test_bf16_grouped_mm_runs_torch_kernel_at_a_rank_it_cannot_stride():
    """In bf16 transformers captures torch's `_grouped_mm` kernel, which needs 16-byte strides: rank 4 (8 bytes) runs
    because the factors are zero-padded to rank 8."""
    model = qwen3_moe("grouped_mm").to(torch.bfloat16)
    nm = neat_fx.transform(model, EXPERT_PATTERNS, EXAMPLE, rank=4, modes=("eval",))
    assert any(str(n.target) == "aten._grouped_mm.default" for n in nm.graph("eval").nodes)
    randomize_adapters(nm, std=0.3)
    ids = _inputs(5)
    with torch.no_grad():
        out = nm(input_ids=ids).logits.float()
        want = reference(model, nm)(input_ids=ids).logits.float()
        assert rel_diff(out, want) <= 2e-2  # bf16: the reference rounds W0 + ΔW, nm rounds the update
        assert rel_diff(model(input_ids=ids).logits.float(), want) > 0.1


def test_eager_experts_capture_error_names_the_implementation_to_use():
    model = qwen3_moe("eager")  # a Python loop over the experts a batch reaches: torch.export refuses it
    with pytest.raises(neat_fx.CaptureError, match=r'experts_implementation="batched_mm"'):
        neat_fx.transform(model, "*q_proj", _inputs(0))
