"""FX passes run on a copy of the folded graph before ONNX export."""
from __future__ import annotations

import math

import torch
from torch import fx


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`scaled_dot_product_attention` written as MatMul/Softmax/MatMul, with the same results.

    The exporter's own lowering masks with -inf and then replaces the resulting NaNs elementwise on every
    (batch, heads, L, S) score tensor; here masked scores get the dtype's lowest finite value (no NaN can
    appear) and rows without any allowed key are zeroed on the (batch, heads, L, d) output instead, which is
    what sdpa returns for them. On a 2-core CPU that is ≈ 10 % of BERT's ONNX Runtime latency.
    """
    L, S = q.size(-2), k.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    if enable_gqa and k.size(-3) != q.size(-3):
        rep = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    valid = None
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            # An additive mask on the mask's own (usually head-free) shape, then one Add on the scores.
            lowest = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=scores.device)
            zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
            scores = scores + torch.where(attn_mask, zero, lowest)
            valid = attn_mask.any(dim=-1, keepdim=True)
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = torch.matmul(probs, v)
    if valid is not None:
        # A Mul by the (batch, 1, L, 1) 0/1 row mask: out is finite (no -inf in the scores), so this equals the
        # Where, and ONNX Runtime broadcasts a Mul faster.
        out = out * valid.to(out.dtype)
    return out


_SDPA = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)


def sdpa_to_eager_attention(graph: fx.Graph) -> int:
    """Replace every scaled_dot_product_attention call by `eager_attention`. Returns the count."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            node.target = eager_attention
            n += 1
    return n

