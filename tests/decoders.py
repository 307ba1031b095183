"""Small random decoder LMs in the shapes of public families, for the generation and tied-head tests:
builders return a model in eval mode, captured without a cache (`use_cache=False`)."""

from __future__ import annotations

import torch

VOCAB = 96


def _common(**over):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(over)
    return base


def llama(**over):
    import transformers as T

    return T.LlamaForCausalLM(T.LlamaConfig(**_common(**over)))


#: LLaMA with heads of 16 (hidden 32, 4 heads): ONNX Runtime's GroupQueryAttention rotates q/k itself only for head
#: sizes that are multiples of 16, so the with-past tests build LLaMA so (that path) and keep Qwen2/Mistral at heads
#: of 8 (the Split + RotaryEmbedding one): `build("llama", **GQA_ROTARY)`
GQA_ROTARY = dict(head_dim=16)


def qwen2():
    import transformers as T

    return T.Qwen2ForCausalLM(T.Qwen2Config(**_common(tie_word_embeddings=False)))


def mistral():
    import transformers as T

    # a window shorter than prompt + 32 new tokens, so the cache's sliding window matters
    return T.MistralForCausalLM(T.MistralConfig(**_common(sliding_window=12)))


def gpt2():
    import transformers as T

    cfg = T.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return T.GPT2LMHeadModel(cfg)  # Conv1D projections, head tied to the embedding


def phi3():
    import transformers as T

    return T.Phi3ForCausalLM(T.Phi3Config(**_common(num_key_value_heads=4)))  # fused qkv_proj, gate_up_proj


def gemma2():
    import transformers as T

    cfg = T.Gemma2Config(
        **_common(head_dim=8, sliding_window=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    )
    return T.Gemma2ForCausalLM(cfg)  # tied head, soft-capping, alternating sliding-window layers


DECODERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2, "phi3": phi3, "gemma2": gemma2}


def build(name: str, seed: int = 0, **config):
    """The family's small model; `config` overrides its config (LLaMA only)."""
    torch.manual_seed(seed)
    return (DECODERS[name](**config) if config else DECODERS[name]()).eval()


def left_padded(lengths=(9, 5), seed: int = 1, pad: int = 0):
    """A batch of prompts of different lengths, padded on the left, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def example_inputs(seed: int = 2):
    """Capture inputs: a left-padded batch with explicit position ids (what generation feeds)."""
    ids, mask = left_padded((8, 6), seed=seed)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions)
