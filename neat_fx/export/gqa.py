"""The fast with-past graph for LLaMA-shaped decoders (LLaMA, Qwen2, Mistral): what onnxruntime-genai's model
builder emits, from the model's own modules. Each supported layer's attention runs as

    packed q/k/v MatMul → GroupQueryAttention(packed, do_rotary) → o_proj

(ONNX Runtime contrib ops, CPU and CUDA): key/value heads are read as they are (no Expand), the op rotates q and k
with cos/sin tables taken from the model's own rotary module and appends the new keys and values to the cache
itself (past/present in the [batch, kv heads, length, head size] layout the builder uses; the runner may bind one
buffer as both, see generation.py), and the MLP's gate and up projections are one MatMul. Head sizes that are not
a multiple of 16 (the CPU kernel's rotary needs it) keep a Split and two `RotaryEmbedding` nodes before the op.

Positions: left-padded batches keep their layout — every row counts as `total_sequence_length` tokens (`seqlens_k`
and the total derived from the attention mask inside the graph), the padding is an additive `attention_bias` (which
also carries sliding windows), and a token is rotated at its column in the row, not at its count of real tokens
before it. Rotary attention depends only on the distance between positions, and the real tokens of a left-padded
row are contiguous, so the logits are the model's own (to rounding); the cached keys of a padded row are rotated
by its padding more than Hugging Face's (a cache from the model's own forward cannot be fed to the file, and the
file's `position_ids` input is unused by these layers). ONNX Runtime takes q/k/v of more than one token with a
past only at batch 1 (chunked prefill), as for the builder's files.

Not covered (those layers stay on the model's own code, `MultiHeadAttention` after onnxscript's fusions, and the
export report says which and why): other attention classes (GPT-2, Phi-3's fused qkv, Gemma-2's soft-capping,
Qwen3's q/k norms…), rotary scalings whose tables depend on the sequence length (dynamic, longrope), modules
whose projections are not plain weights. (docs/design.md, "Decoder LLMs → ONNX")
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: attention classes whose forward is `q/k/v_proj → rotary(cos, sin) → cache.update → attention → o_proj`, with
#: nothing else between (checked against their transformers 5 source)
ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
#: MLP classes computing down(act(gate(x)) * up(x))
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "MistralMLP")
#: rotary types whose inverse frequencies and scaling do not depend on the sequence length: one cos/sin table
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


# ---------------------------------------------------------------------------------------------------------------
# The two contrib ops as torch custom ops: reference implementations (what ONNX Runtime computes on left-padded,
# full-length rows), fakes for tracing, and their ONNX translations.


@torch.library.custom_op("neat_fx::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
    attention_bias: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's GroupQueryAttention where every row holds `total_sequence_length` tokens: query [B, S,
    heads·d] (or q/k/v packed in it when `key` is None), key/value [B, S, kv_heads·d], past [B, kv_heads, P, d],
    attention_bias [B, 1, S, P + S] (additive); causal. With cos/sin tables (`do_rotary`) q and k are rotated
    at positions P…P+S-1, the column of each token in its row. Returns (output [B, S, heads·d], present key,
    present value [B, kv_heads, P + S, d])."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    if key is None or value is None:
        query, key, value = query.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], -1)
    if cos_cache is not None and sin_cache is not None:
        p = past_key.shape[2]
        columns = torch.arange(p, p + s, device=query.device).expand(b, s)
        query = _rotate(query, columns, cos_cache, sin_cache, num_heads)
        key = _rotate(key, columns, cos_cache, sin_cache, kv_num_heads)
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)
    k = torch.cat([past_key, key.reshape(b, s, kv_num_heads, d).transpose(1, 2)], 2)
    v = torch.cat([past_value, value.reshape(b, s, kv_num_heads, d).transpose(1, 2)], 2)
    t = k.shape[2]
    rep = num_heads // kv_num_heads
    scores = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    causal = torch.arange(t, device=q.device)[None, :] <= (torch.arange(s, device=q.device) + t - s)[:, None]
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min) + attention_bias
    out = torch.softmax(scores, -1) @ v.repeat_interleave(rep, 1)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), k, v


@group_query_attention.register_fake
def _(
    query,
    key,
    value,
    past_key,
    past_value,
    seqlens_k,
    total_sequence_length,
    cos_cache,
    sin_cache,
    attention_bias,
    num_heads,
    kv_num_heads,
    scale,
):
    b, s, _ = query.shape
    kv, p, d = past_key.shape[1], past_key.shape[2], past_key.shape[3]
    return (
        query.new_empty(b, s, num_heads * d),
        past_key.new_empty(b, kv, p + s, d),
        past_value.new_empty(b, kv, p + s, d),
    )


def _rotate(
    x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """ONNX Runtime's RotaryEmbedding (not interleaved) on x [B, S, heads·d]: the first 2·cos_cache.shape[1]
    features of each head rotated by the table rows at `position_ids` [B, S], the rest passed through."""
    b, s, _ = x.shape
    h = x.view(b, s, num_heads, -1)
    half = cos_cache.shape[-1]
    cos, sin = cos_cache[position_ids][:, :, None], sin_cache[position_ids][:, :, None]
    x1, x2, rest = h[..., :half], h[..., half : 2 * half], h[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1).reshape(b, s, -1)


rotary_embedding = torch.library.custom_op("neat_fx::rotary_embedding", _rotate, mutates_args=())


@rotary_embedding.register_fake
def _(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


def _schema(name: str, inputs, outputs, attributes):
    """An onnx OpSchema for a com.microsoft contrib op (the onnx package knows only the standard domain): enough
    for the exporter to lay out the node's inputs, outputs and attributes."""
    from onnx import defs

    P = defs.OpSchema.FormalParameter
    Opt = defs.OpSchema.FormalParameterOption.Optional
    A = defs.OpSchema.AttrType
    types = {
        "T": ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
        "M": ["tensor(int32)"],
        "I": ["tensor(int64)"],
    }
    used = sorted({t for _, t, _ in inputs + outputs})
    return defs.OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[P(n, t, param_option=Opt) if optional else P(n, t) for n, t, optional in inputs],
        outputs=[P(n, t) for n, t, _ in outputs],
        type_constraints=[(t, types[t], "") for t in used],
        attributes=[defs.OpSchema.Attribute(n, getattr(A, kind), "", required=False) for n, kind in attributes],
    )


def translations() -> dict:
    """torch.onnx custom translations of the two ops to com.microsoft contrib ops."""
    from onnxscript.values import Op, Opset

    msft = Opset("com.microsoft", 1)
    gqa_op = Op(
        msft,
        "GroupQueryAttention",
        _schema(
            "GroupQueryAttention",
            [
                ("query", "T", False),
                ("key", "T", True),
                ("value", "T", True),
                ("past_key", "T", True),
                ("past_value", "T", True),
                ("seqlens_k", "M", False),
                ("total_sequence_length", "M", False),
                ("cos_cache", "T", True),
                ("sin_cache", "T", True),
                ("position_ids", "I", True),
                ("attention_bias", "T", True),
            ],
            [("output", "T", False), ("present_key", "T", False), ("present_value", "T", False)],
            [("num_heads", "INT"), ("kv_num_heads", "INT"), ("scale", "FLOAT"), ("do_rotary", "INT")],
        ),
    )
    rotary_op = Op(
        msft,
        "RotaryEmbedding",
        _schema(
            "RotaryEmbedding",
            [("input", "T", False), ("position_ids", "I", False), ("cos_cache", "T", False), ("sin_cache", "T", False)],
            [("output", "T", False)],
            [("interleaved", "INT"), ("num_heads", "INT")],
        ),
    )

    def gqa(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total,
        cos_cache,
        sin_cache,
        bias,
        num_heads: int,
        kv_num_heads: int,
        scale: float,
    ):
        return gqa_op(
            query,
            key,
            value,
            past_key,
            past_value,
            seqlens_k,
            total,
            cos_cache,
            sin_cache,
            None,
            bias,
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            scale=scale,
            do_rotary=int(cos_cache is not None),
        )

    def rotary(x, position_ids, cos_cache, sin_cache, num_heads: int):
        return rotary_op(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=num_heads)

    return {
        torch.ops.neat_fx.group_query_attention.default: gqa,
        torch.ops.neat_fx.rotary_embedding.default: rotary,
    }


# ---------------------------------------------------------------------------------------------------------------
# Which layers take the fast path


@dataclass
class LayerPlan:
    """One decoder layer: its attention (and MLP) module paths, and whether the fast path takes it (else why)."""

    index: int
    attention: str
    mlp: str | None
    fast: bool
    why: str = ""
    window: int | None = None
    rotary_in_op: bool = False  # GroupQueryAttention's do_rotary (else Split + RotaryEmbedding before it)


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)
    rotary: str | None = None  # path of the model's rotary module
    why: str = ""  # why no layer takes it (model-wide reasons)

    @property
    def fast(self) -> bool:
        return any(la.fast for la in self.layers)

    def describe(self) -> list[str]:
        """One line per group of consecutive layers with the same route, for the export report."""
        if not self.layers:
            return [f"attention: the model's own code on every layer ({self.why})"] if self.why else []
        lines, start = [], 0
        for i in range(1, len(self.layers) + 1):
            a = self.layers[start]
            if i < len(self.layers) and (self.layers[i].fast, self.layers[i].why, self.layers[i].rotary_in_op) == (
                a.fast,
                a.why,
                a.rotary_in_op,
            ):
                continue
            span = f"layer {a.index}" if i - 1 == start else f"layers {a.index}–{self.layers[i - 1].index}"
            if a.fast:
                rotary = "q/k rotated by the op" if a.rotary_in_op else "RotaryEmbedding before it"
                lines.append(
                    f"attention: {span} GroupQueryAttention (kv heads unrepeated, cache appended by the op, {rotary}), "
                    f"q/k/v and gate/up packed"
                )
            else:
                lines.append(f"attention: {span} the model's own code ({a.why})")
            start = i
        return lines


def _linear(m) -> bool:
    return type(m) is nn.Linear


def plan(model: nn.Module, position_ids: bool) -> Plan:
    """Which attention modules of `model` the fast path replaces (structure and rotary type checked)."""
    config = getattr(model, "config", None)
    out = Plan()
    if not position_ids:
        out.why = "the forward takes no position_ids"
        return out
    rotary = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    attns = [
        (n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention") and hasattr(m, "o_proj")
    ]
    if not attns:
        attns = [
            (n, m)
            for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
        ]
    if len(rotary) != 1:
        out.why = f"{len(rotary)} rotary modules (one shared table expected)"
    else:
        rope = getattr(rotary[0][1], "rope_type", None)
        if rope not in STATIC_ROPE:
            out.why = (
                f"rotary type {rope!r}: its table depends on the sequence length (fast path: {', '.join(STATIC_ROPE)})"
            )
        elif getattr(config, "attn_logit_softcapping", None):
            out.why = "soft-capped attention"
        out.rotary = rotary[0][0]
    modules = dict(model.named_modules())
    for n, m in attns:
        parent = n.rsplit(".", 1)[0] if "." in n else ""
        mlp_path = f"{parent}.mlp" if parent else "mlp"
        mlp = modules.get(mlp_path)
        la = LayerPlan(index=getattr(m, "layer_idx", len(out.layers)), attention=n, mlp=None, fast=False)
        name = type(m).__name__
        if out.why:
            la.why = out.why
        elif name not in ATTENTION_CLASSES:
            la.why = f"{name} is not one of {', '.join(ATTENTION_CLASSES)}"
        elif not all(_linear(getattr(m, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            la.why = "q/k/v/o projections are not plain nn.Linear"
        elif getattr(m, "training", False) or getattr(m, "attention_dropout", 0.0) and m.training:
            la.why = "in training mode"
        else:
            la.fast = True
            # ONNX Runtime's CPU kernel rotates inside the op for head sizes that are multiples of 16 only
            la.rotary_in_op = int(getattr(m, "head_dim", 0)) % 16 == 0
            window = getattr(m, "sliding_window", None)
            if window is None and name == "MistralAttention":
                window = getattr(config, "sliding_window", None)
            la.window = int(window) if window else None
            if type(mlp).__name__ in MLP_CLASSES and all(
                _linear(getattr(mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")
            ):
                la.mlp = mlp_path
        out.layers.append(la)
    out.layers.sort(key=lambda la: la.index)
    if not out.layers and not out.why:
        out.why = "no attention module found"
    return out


# ---------------------------------------------------------------------------------------------------------------
# The forwards that replace the model's on the fast layers (set on the export's view of the model, per call)


class Context:
    """Per call: the inputs every fast layer reads (positions, cache lengths, biases) and the presents they give."""

    def __init__(self, attention_mask, position_ids, past, cos, sin, dtype):
        self.mask = attention_mask
        self.position_ids = position_ids
        self.past = past
        self.cos, self.sin = cos, sin
        self.dtype = dtype
        self.present: dict[int, tuple] = {}
        # every row counts as `total` tokens (left padding is masked by the bias): seqlens_k = total - 1
        ones = torch.ones_like(attention_mask, dtype=torch.int32)
        self.seqlens_k = ones.sum(-1, dtype=torch.int32) - 1
        self.total = ones[0].sum(dtype=torch.int32)
        self._bias: dict = {}

    def bias(self, length: int, window: int | None) -> torch.Tensor:
        """[B, 1, S, T] additive: padding keys masked, and keys at or beyond `window` positions back."""
        key = window
        if key not in self._bias:
            lowest = torch.finfo(self.dtype).min
            keep = self.mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            t = self.mask.shape[1]
            kv = torch.arange(t, device=self.mask.device)
            q = torch.arange(length, device=self.mask.device) + (t - length)
            if window:
                keep = keep & (kv[None, :] > (q[:, None] - window))[None, None]
            else:
                keep = keep.expand(-1, -1, length, -1)
            zero = torch.zeros((), dtype=self.dtype, device=self.mask.device)
            self._bias[key] = torch.where(keep, zero, torch.tensor(lowest, dtype=self.dtype, device=self.mask.device))
        return self._bias[key]


def _attention_forward(module, ctx: Context, layer: LayerPlan, qkv_w, qkv_b, hidden_states, *args, **kwargs):
    d = module.head_dim
    heads = module.config.num_attention_heads
    kv_heads = module.config.num_key_value_heads
    qkv = F.linear(hidden_states, qkv_w, qkv_b)
    i = module.layer_idx
    if layer.rotary_in_op and 2 * ctx.cos.shape[-1] == d:
        # q/k/v packed into the op, rotated inside it at each token's column (module docstring: positions)
        q, k, v, cos, sin = qkv, None, None, ctx.cos, ctx.sin
    else:
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
        q = torch.ops.neat_fx.rotary_embedding(q, ctx.position_ids, ctx.cos, ctx.sin, heads)
        k = torch.ops.neat_fx.rotary_embedding(k, ctx.position_ids, ctx.cos, ctx.sin, kv_heads)
        cos = sin = None
    out, present_k, present_v = torch.ops.neat_fx.group_query_attention(
        q,
        k,
        v,
        ctx.past[2 * i],
        ctx.past[2 * i + 1],
        ctx.seqlens_k,
        ctx.total,
        cos,
        sin,
        ctx.bias(hidden_states.shape[1], layer.window),
        heads,
        kv_heads,
        float(module.scaling),
    )
    ctx.present[i] = (present_k, present_v)
    return module.o_proj(out), None


def _mlp_forward(module, w, bias, x):
    gate, up = F.linear(x, w, bias).chunk(2, -1)
    return module.down_proj(module.act_fn(gate) * up)


def rotary_tables(rotary: nn.Module, head_dim: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, rotary dim / 2] from the model's own rotary module at positions 0…length-1 (its
    attention scaling included): the values it computes at each position, bit for bit."""
    x = torch.zeros(1, 1, head_dim, device=device)
    with torch.no_grad():
        cos, sin = rotary(x, torch.arange(length, device=device)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def install(view: nn.Module, the_plan: Plan, ctx: Context, packed: dict):
    """Set the fast forwards on the view's modules (the view is per call: the model's own modules untouched)."""
    for la in the_plan.layers:
        if not la.fast:
            continue
        attn = view.get_submodule(la.attention)
        w, b = packed[("qkv", la.index)]
        attn.forward = functools.partial(_attention_forward, attn, ctx, la, w, b)
        if la.mlp:
            mlp = view.get_submodule(la.mlp)
            w, b = packed[("gate_up", la.index)]
            mlp.forward = functools.partial(_mlp_forward, mlp, w, b)


def packed_weights(model: nn.Module, weights: dict, the_plan: Plan) -> dict:
    """{("qkv" | "gate_up", layer): (weight, bias or None)}: the layers' adapted (else own) projection weights
    concatenated along the outputs, so that one MatMul (and, quantized, one MatMulNBits) reads the activation."""

    def get(path):
        if path in weights:
            return weights[path]
        owner, name = path.rsplit(".", 1)
        return getattr(model.get_submodule(owner), name)

    out = {}
    for la in the_plan.layers:
        if not la.fast:
            continue
        groups = [("qkv", la.attention, ("q_proj", "k_proj", "v_proj"))]
        if la.mlp:
            groups.append(("gate_up", la.mlp, ("gate_proj", "up_proj")))
        for kind, owner, names in groups:
            ws = [get(f"{owner}.{n}.weight").detach() for n in names]
            mods = [model.get_submodule(f"{owner}.{n}") for n in names]
            bias = None
            if any(m.bias is not None for m in mods):
                bias = torch.cat(
                    [
                        (get(f"{owner}.{n}.bias") if m.bias is not None else torch.zeros(m.out_features)).detach()
                        for n, m in zip(names, mods)
                    ]
                )
            if bias is not None and not bool(bias.any()):  # all zero (a fresh Qwen2's q/k/v): no Add in the graph
                bias = None
            out[(kind, la.index)] = (torch.cat(ws, 0), bias)
    return out
