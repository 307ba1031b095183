"""What the documentation's Python blocks run against in tests/test_docs.py: the pages name hub models
("Qwen/Qwen2.5-0.5B"), and this machine has no network. `install()` makes transformers' `from_pretrained` give, for
the hub ids below, a tiny model with random weights of the same family (and a character-level tokenizer); local
folders (what a block saved) load as usual. Everything else in a block runs unchanged."""

from __future__ import annotations

import os
from pathlib import Path

#: hub id → (transformers config class, the family's distinguishing settings)
HUB_MODELS = {
    "Qwen/Qwen2.5-0.5B": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "meta-llama/Llama-3.2-1B": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "google-bert/bert-base-uncased": ("BertConfig", {}),
    "sentence-transformers/all-MiniLM-L6-v2": ("BertConfig", {}),
}
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CHARS = "".join(chr(c) for c in range(32, 127))
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "[CLS]", "[SEP]"]


def _is_hub_id(name) -> bool:
    return isinstance(name, str) and name in HUB_MODELS and not Path(name).exists()


def tokenizer(padding_side: str = "right", **_):
    """One token per character (printable ASCII), BOS/CLS first, a pad token: enough for any page's strings."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


def config(name: str, **overrides):
    import transformers

    cls_name, family = HUB_MODELS[name]
    settings = dict(TINY, **family, vocab_size=len(SPECIALS) + len(CHARS), pad_token_id=0, bos_token_id=1)
    settings["eos_token_id"] = 2
    if cls_name == "BertConfig":
        settings.pop("num_key_value_heads")
    settings.update(overrides)
    return getattr(transformers, cls_name)(**settings)


def install():
    """Patch transformers' loaders for the hub ids above (this process only)."""
    import torch
    import transformers
    from transformers.models.auto import auto_factory

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_loader = auto_factory._BaseAutoModelClass.from_pretrained.__func__
    config_loader = transformers.AutoConfig.from_pretrained.__func__
    tokenizer_loader = transformers.AutoTokenizer.from_pretrained.__func__

    def load_model(cls, name, *args, **kwargs):
        if not _is_hub_id(name):
            return model_loader(cls, name, *args, **kwargs)
        cfg = kwargs.pop("config", None) or config(
            name, **{k: kwargs.pop(k) for k in list(kwargs) if k in ("num_labels", "use_cache")}
        )
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        quantization = kwargs.pop("quantization_config", None)
        torch.manual_seed(0)
        model = cls.from_config(cfg)
        model = model.to(dtype) if isinstance(dtype, torch.dtype) else model
        if quantization is None:
            return model
        # quantized at load by transformers' own quantizer (BitsAndBytesConfig, TorchAoConfig), as from the hub
        import tempfile

        folder = tempfile.mkdtemp(prefix="docs_env_")
        model.save_pretrained(folder)
        return model_loader(cls, folder, quantization_config=quantization, **({"dtype": dtype} if dtype else {}))

    def load_config(cls, name, *args, **kwargs):
        if not _is_hub_id(name):
            return config_loader(cls, name, *args, **kwargs)
        unused = kwargs.pop("return_unused_kwargs", False)
        cfg = config(name, **kwargs)
        return (cfg, {}) if unused else cfg

    def load_tokenizer(cls, name, *args, **kwargs):
        return tokenizer(**kwargs) if _is_hub_id(name) else tokenizer_loader(cls, name, *args, **kwargs)

    auto_factory._BaseAutoModelClass.from_pretrained = classmethod(load_model)
    for name in dir(transformers):  # each Auto class holds its own copy of from_pretrained
        if name.startswith("AutoModel"):
            cls = getattr(transformers, name)
            if isinstance(cls, type) and issubclass(cls, auto_factory._BaseAutoModelClass):
                cls.from_pretrained = classmethod(load_model)
    transformers.AutoConfig.from_pretrained = classmethod(load_config)
    transformers.AutoTokenizer.from_pretrained = classmethod(load_tokenizer)
