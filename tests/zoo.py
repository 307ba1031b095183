"""Small randomly initialised models for the tests: builders return (model, example_inputs, other_inputs,
patterns). `other_inputs` has another batch size and sequence length, to prove the capture is dynamic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _ids(vocab, b, s, g):
    return torch.randint(0, vocab, (b, s), generator=g)


def bert():
    import transformers

    torch.manual_seed(0)

    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    m = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    ex = dict(input_ids=_ids(120, 4, 12, g), attention_mask=torch.ones(4, 12, dtype=torch.long))
    other = dict(input_ids=_ids(120, 3, 9, g), attention_mask=torch.ones(3, 9, dtype=torch.long))
    return m, ex, other, ["*query", "*value"]


def gpt2():
    import transformers

    torch.manual_seed(0)

    cfg = transformers.GPT2Config(
        vocab_size=120,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        use_cache=False,
        attn_implementation="eager",
    )
    m = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(2)
    return m, dict(input_ids=_ids(120, 2, 10, g)), dict(input_ids=_ids(120, 3, 7, g)), ["*c_attn", "*mlp.c_fc"]


def llama():
    import transformers

    torch.manual_seed(0)

    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        use_cache=False,
    )
    m = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(3)
    return m, dict(input_ids=_ids(120, 2, 10, g)), dict(input_ids=_ids(120, 3, 6, g)), ["*q_proj", "*v_proj"]


def vit():
    import transformers

    torch.manual_seed(0)

    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
        initializer_range=0.2,
    )
    m = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(4)
    return (
        m,
        dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)),
        dict(pixel_values=torch.randn(3, 3, 16, 16, generator=g)),
        ["*q_proj", "*v_proj"],
    )


def t5():
    import transformers

    torch.manual_seed(0)

    cfg = transformers.T5Config(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        use_cache=False,
    )
    m = transformers.T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(5)
    ex = dict(input_ids=_ids(120, 2, 10, g), decoder_input_ids=_ids(120, 2, 6, g))
    other = dict(input_ids=_ids(120, 3, 7, g), decoder_input_ids=_ids(120, 3, 5, g))
    return m, ex, other, ["*SelfAttention.q", "*SelfAttention.v", "*EncDecAttention.q"]


def transformer_encoder():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    g = torch.Generator().manual_seed(6)
    return (
        m,
        (torch.randn(2, 10, 32, generator=g),),
        (torch.randn(3, 7, 32, generator=g),),
        ["*in_proj_weight", "*linear1"],
    )


class HomeGrown(nn.Module):
    """Custom code: F.linear on a bare parameter, x @ W (in, out) and x @ W.T (out, in)."""

    def __init__(self, d=16, h=24):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w_in = nn.Parameter(torch.randn(h, d, generator=g) / d**0.5)
        self.b_in = nn.Parameter(torch.zeros(h))
        self.w_mid = nn.Parameter(torch.randn(h, h, generator=g) / h**0.5)  # used as x @ w_mid
        self.w_out = nn.Parameter(torch.randn(d, h, generator=g) / h**0.5)  # used as x @ w_out.T
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w_in, self.b_in))
        h = torch.tanh(h @ self.w_mid)
        return self.norm(x + h @ self.w_out.T)


def home_grown():
    g = torch.Generator().manual_seed(8)
    return (
        HomeGrown(),
        (torch.randn(2, 5, 16, generator=g),),
        (torch.randn(4, 3, 16, generator=g),),
        ["w_in", "w_mid", "w_out"],
    )


class Projections(nn.Module):
    """Custom code with the sites the op table added: einsum projections (weight (out, in) and (in, out)) and
    weights on the left of a matmul (directly and through a transpose)."""

    def __init__(self, d=16, h=24):
        super().__init__()
        g = torch.Generator().manual_seed(12)
        self.w_in = nn.Parameter(torch.randn(h, d, generator=g) / d**0.5)  # einsum("bsd,hd->bsh"): out_in
        self.w_mid = nn.Parameter(torch.randn(h, h, generator=g) / h**0.5)  # einsum("...i,io->...o"): in_out
        self.w_left = nn.Parameter(torch.randn(d, h, generator=g) / h**0.5)  # w_left @ hᵀ: out_in, left
        self.w_left_t = nn.Parameter(torch.randn(d, d, generator=g) / d**0.5)  # w_left_t.T @ zᵀ: in_out, left
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = F.gelu(torch.einsum("bsd,hd->bsh", x, self.w_in))
        h = torch.tanh(torch.einsum("...i,io->...o", h, self.w_mid))
        z = torch.matmul(self.w_left, h.transpose(-1, -2)).transpose(-1, -2)
        z = (self.w_left_t.T @ z.transpose(-1, -2)).transpose(-1, -2)
        return self.norm(x + z)


def projections():
    g = torch.Generator().manual_seed(13)
    return (
        Projections(),
        (torch.randn(2, 5, 16, generator=g),),
        (torch.randn(4, 3, 16, generator=g),),
        ["w_in", "w_mid", "w_left", "w_left_t"],
    )


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


def cnn():
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    # another batch size, the same image size: dynamic=True keeps image height/width static (dynamic="all" frees them)
    return SmallCNN(), (torch.randn(4, 3, 12, 12, generator=g),), (torch.randn(2, 3, 12, 12, generator=g),), ["head"]


class Tied(nn.Module):
    """One weight used by two linear ops (tied), plus an embedding tied to an output head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(10)
        self.emb = nn.Embedding(50, 16)
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            self.shared.weight.copy_(torch.randn(16, 16, generator=g) / 4)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.relu(self.shared(h))
        h = self.shared(h)
        return self.head(h)


def tied():
    g = torch.Generator().manual_seed(11)
    return (
        Tied(),
        (torch.randint(0, 50, (2, 7), generator=g),),
        (torch.randint(0, 50, (3, 4), generator=g),),
        ["shared", "head"],
    )


ZOO = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "t5": t5,
    "transformer_encoder": transformer_encoder,
    "home_grown": home_grown,
    "projections": projections,
    "cnn": cnn,
    "tied": tied,
}
