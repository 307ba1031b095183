"""`via="genai"`: a folder that onnxruntime-genai runs (model.onnx + genai_config.json), made by its model builder
from the merged Hugging Face model.

    report = genai_route.export(nm, "qwen-int4/", precision="int4", block_size=32)
    model = onnxruntime_genai.Model("qwen-int4/")        # then GeneratorParams / Generator

The builder (`onnxruntime_genai.models.builder`) is the reference exporter for the LLM families it knows
(LLaMA, Mistral, Qwen2/3, Phi-3, Gemma 1–3, …): GroupQueryAttention with its KV cache, rotary embedding inside
the attention op, int4/int8 `MatMulNBits` weights. It reads a Hugging Face folder, so this route merges
`W0 + ΔW` into a copy of the model (neat_fx/export/merged.py), saves it to a scratch folder beside the destination, runs
the builder there, checks greedy generation in onnxruntime-genai against the merged model's own `generate`, and
only then renames the finished folder onto the destination: on any failure nothing is left there.

What the route adds to the builder's input (docs/design.md, "The genai route"):
- a tokenizer: the builder loads one with AutoTokenizer (and copies it to the output). The model's own is used
  when `tokenizer=` names one or the model's `name_or_path` has one on disk; otherwise (random-weight models)
  a placeholder word-level tokenizer over the vocabulary ids lets the builder run, and is left out of the
  output (onnxruntime-genai generates from token ids without one; copy the real tokenizer files in to get
  `og.Tokenizer`).
- `layer_types` for configs that have a `sliding_window` but no `layer_types` (Mistral, Phi-3 in
  transformers 5): without it the builder silently exports full attention, and generation past the window
  differs from the model's own.
- `original_max_position_embeddings = max_position_embeddings` for a Phi-3 config without rope scaling whose
  two values differ (the builder would take it for LongRoPE and fail).
- `windowed_kv_cache=false` for models with sliding-window layers: the builder's window-sized caches refuse
  batches of prompts of different lengths.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neat_fx.atomic import fsync_tree
from neat_fx.containers import FoldedModule, NeatModule
from neat_fx.errors import ConfigError

from . import merged
from .onnx_export import ExportError

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
PROVIDERS = ("cpu", "cuda")
# What the builder accepts (it prints the list; anything else fails deep inside it).
VALID = {
    ("fp32", "cpu"),
    ("fp32", "cuda"),
    ("fp16", "cuda"),
    ("bf16", "cuda"),
    ("int8", "cpu"),
    ("int8", "cuda"),
    ("int4", "cpu"),
    ("int4", "cuda"),
}
BLOCK_SIZES = (16, 32, 64, 128, 256)
NEW_TOKENS = 16  # greedy tokens compared per prompt at verification
GROSS = 0.5  # quantized precisions: prefill logits correlate with the reference's at least this much (gross errors)
EXACT = {"fp32": 1e-3}  # float precisions: tokens identical, and prefill logits within this fraction of the scale
#: the oldest onnxruntime-genai tested (its builder's library entry points and option names; 0.12's differ)
MIN_VERSION = (0, 15)
PLACEHOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def available() -> tuple[bool, str]:
    try:
        import onnxruntime_genai
        from onnxruntime_genai.models import builder  # noqa: F401

        version = onnxruntime_genai.__version__
        if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
            return False, (
                f"onnxruntime-genai {version} is installed; via='genai' needs >= "
                f"{'.'.join(map(str, MIN_VERSION))} (pip install -U onnxruntime-genai)"
            )
    except Exception as exc:  # ImportError, or a missing dependency of the builder (onnx_ir, onnxscript)
        return False, (
            f"onnxruntime-genai and its model builder cannot be imported here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); install it with `pip install "
            f"'neat-fx[genai]'` (onnxruntime-genai, onnx-ir, onnxscript), or use via='neat_fx' (the default)."
        )
    return True, ""


def builder_architectures() -> tuple[str, ...]:
    """The Hugging Face architectures (class names) the installed builder dispatches on, read from its source."""
    from onnxruntime_genai.models import builder

    try:
        source = inspect.getsource(builder.create_model)
    except (OSError, TypeError):
        return ()
    return tuple(dict.fromkeys(re.findall(r'architectures\[0\] == "(\w+)"', source)))


@dataclass
class GenaiReport:
    """What `export` (to_onnx(..., via="genai")) produced and checked."""

    path: Path  # the output folder
    size_bytes: int
    precision: str
    execution_provider: str
    architecture: str
    block_size: int | None
    accuracy_level: int | None
    files: list[str]
    op_counts: dict[str, int]
    verification: dict  # see _verify; {} when verify=False
    tokenizer: str  # where the output's tokenizer came from ("placeholder (not saved)" for random models)
    builder_options: dict[str, str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def max_rel_diff(self) -> float:
        return float(self.verification.get("logits_max_rel", float("nan")))

    @property
    def tokens_equal(self) -> bool | None:
        return self.verification.get("tokens_equal")

    def __str__(self) -> str:
        quant = f", block {self.block_size}, accuracy level {self.accuracy_level}" if self.block_size else ""
        lines = [
            f"genai folder {self.path} ({self.size_bytes / 2**20:.1f} MB: {', '.join(self.files)})",
            f"model        {self.architecture}, {self.precision} for {self.execution_provider}{quant}",
            f"tokenizer    {self.tokenizer}",
        ]
        v = self.verification
        if v.get("skipped"):
            lines.append(f"verification skipped: {v['skipped']}")
        elif v:
            outcome = "identical tokens" if v["tokens_equal"] else f"token agreement {v['agreement']:.1%}"
            lines.append(
                f"verification greedy {v['new_tokens']} tokens, prompts of {v['prompt_lengths']} tokens "
                f"({'one batch' if v['batched'] else 'one prompt at a time'}): "
                f"{outcome}"
                f"; prefill logits max abs {v['logits_max_abs']:.2e}, {v['logits_max_rel']:.2e} of their scale, "
                f"correlation {v['logits_min_corr']:.4f}"
            )
        lines += [f"note         {n}" for n in self.notes]
        lines.append(f"took         {self.seconds:.1f} s")
        return "\n".join(lines)


def _source(module: nn.Module) -> nn.Module:
    """The Hugging Face model behind `module`, without copying anything."""
    if isinstance(module, NeatModule):
        return module.model
    if isinstance(module, FoldedModule):
        from neat_fx.generate import source_model

        return source_model(module)
    return module


def _check_family(module: nn.Module) -> str:
    model = _source(module)
    config = getattr(model, "config", None)
    if not hasattr(model, "save_pretrained") or config is None:
        raise TypeError(
            f"via='genai' exports Hugging Face decoder models (with a config and save_pretrained); "
            f"{type(model).__name__} is not one. Use via='neat_fx' (the default), which exports any module."
        )
    architecture = type(model).__name__
    known = builder_architectures()
    if known and architecture not in known:
        family = getattr(config, "model_type", None) or architecture
        raise ExportError(
            f"onnxruntime-genai's model builder does not support the {family!r} family ({architecture}); it "
            f"knows {', '.join(a for a in known if a.endswith('ForCausalLM'))} (and a few multimodal ones). Use "
            f"via='neat_fx' (the default), which exports any model, decoders with their KV cache included."
        )
    return architecture


def _check_destination(folder: Path) -> None:
    if not folder.parent.is_dir():
        raise FileNotFoundError(f"the folder {folder.parent} does not exist; create it or choose another path")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; via='genai' writes a folder (model.onnx, genai_config.json, …)")
    if folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} exists and is not empty; via='genai' writes a new folder: choose another path or remove it"
        )


def export(
    module: nn.Module,
    folder,
    *,
    precision: str = "int4",
    execution_provider: str = "cpu",
    block_size: int = 32,
    accuracy_level: int | None = None,
    verify: bool = True,
    prompts=None,
    tokenizer=None,
    builder_options: dict | None = None,
    new_tokens: int = NEW_TOKENS,
) -> GenaiReport:
    """Build an onnxruntime-genai folder at `folder` from `module` (NeatModule, FoldedModule or merged HF model).

    precision:   "fp32", "int4" or "int8" (weight-only MatMulNBits, `block_size` 16–256, `accuracy_level` 1–4:
                 the builder's default on CPU is 4, int8 activations) for "cpu"; also "fp16"/"bf16" for "cuda".
    folder:      created; may exist only as an empty folder. Written whole (renamed into place) or not at all.
    verify:      greedy generation in onnxruntime-genai (`new_tokens` per prompt) against the merged model's own
                 `generate`: fp32 must give identical tokens (prefill logits within 1e-3 of their scale), the
                 quantized precisions report token agreement and logit drift (gross errors only: 0.5 of the
                 scale). Needs the execution provider in this onnxruntime-genai (CPU here).
    prompts:     token-id prompts to verify on: a 2-D tensor (with `attention_mask` rows as a dict) or a list of
                 1-D sequences; default two random prompts of 9 and 5 tokens.
    tokenizer:   a tokenizer (or folder) to ship in the output; default the model's own if found on disk.
    builder_options: more KEY=VALUE extra options for the builder (strings), e.g. {"fuse_qkv": "false"}.
    """
    t_start = time.perf_counter()
    ok, why = available()
    if not ok:
        raise ExportError(why)
    check_options(precision, execution_provider, block_size, accuracy_level, builder_options)
    quantized = precision in ("int4", "int8")
    folder = Path(folder)
    _check_destination(folder)
    architecture = _check_family(module)

    notes: list[str] = []
    options: dict[str, str] = {}
    if quantized:
        options["block_size"] = str(block_size)
        if accuracy_level is not None:
            options["accuracy_level"] = str(accuracy_level)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".hf", dir=folder.parent))
    try:
        with _quiet():
            tokenizer_source, ops, levels, verification = _build(
                module,
                stage,
                scratch,
                tokenizer,
                options,
                builder_options,
                precision,
                execution_provider,
                architecture,
                verify,
                prompts,
                new_tokens,
                notes,
            )
        fsync_tree(stage)
        os.replace(stage, folder)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = sorted(p.name for p in folder.iterdir())
    return GenaiReport(
        path=folder,
        size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        precision=precision,
        execution_provider=execution_provider,
        architecture=architecture,
        block_size=block_size if quantized else None,
        accuracy_level=(levels[0] if len(levels) == 1 else None) if quantized else None,
        files=files,
        op_counts=ops,
        verification=verification,
        tokenizer=tokenizer_source,
        builder_options=options,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )


def check_options(precision: str, provider: str, block_size: int, accuracy_level, builder_options) -> None:
    """Refuse a precision / provider / quantization option the builder does not take (before any work)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if provider not in PROVIDERS:
        raise ConfigError(f"execution_provider must be 'cpu' or 'cuda'; got {provider!r}")
    if (precision, provider) not in VALID:
        raise ConfigError(
            f"the builder makes no {precision} model for {provider} (valid: "
            f"{', '.join(f'{p}/{e}' for p, e in sorted(VALID))}); on CPU use fp32, int8 or int4"
        )
    quantized = precision in ("int4", "int8")
    if quantized and block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size must be one of {BLOCK_SIZES}; got {block_size!r}")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level must be 0–4 (4: int8 activations on CPU); got {accuracy_level!r}")
    if builder_options is not None and not isinstance(builder_options, dict):
        raise ConfigError(f"builder_options must be a dict of KEY: VALUE strings, got {type(builder_options).__name__}")


def _build(
    module,
    stage,
    scratch,
    tokenizer,
    options,
    builder_options,
    precision,
    provider,
    architecture,
    verify,
    prompts,
    new_tokens,
    notes,
):
    """Merge, save, build into `stage`, verify; (tokenizer source, op counts, accuracy levels, verification)."""
    hf_dir = scratch / "hf"
    model = merged.merged_copy(module, route="via='genai'")
    model.save_pretrained(hf_dir)
    reference_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    del model  # a copy is freed before the builder loads the folder again (one model in memory at a time)
    gc.collect()
    tokenizer_source, placeholder = _write_tokenizer(hf_dir, _source(module), tokenizer)
    options.update(_patch_config(hf_dir, notes))
    options.update({str(k): str(v) for k, v in (builder_options or {}).items()})
    _run_builder(hf_dir, stage, scratch / "cache", precision, provider, options, architecture)
    if placeholder:
        for name in PLACEHOLDER_FILES:
            with contextlib.suppress(FileNotFoundError):
                (stage / name).unlink()
        notes.append(
            "no tokenizer found: the builder ran with a placeholder over the vocabulary ids, left out of the "
            "folder; onnxruntime-genai generates from token ids (copy the model's tokenizer files in for "
            "og.Tokenizer)"
        )
    ops, levels = _graph_facts(stage / "model.onnx")
    verification: dict = {}
    if verify:
        verification = _verify(hf_dir, stage, prompts, precision, provider, new_tokens, reference_dtype, notes)
    return tokenizer_source, ops, levels, verification


# ---------------------------------------------------------------------------------------------------- the builder


#: loggers the builder's quantization logs to at INFO (ONNX Runtime's quantizer puts an INFO handler on the root)
QUIET_LOGGERS = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization")


@contextlib.contextmanager
def _quiet():
    """transformers' loading / saving bars and the quantizer's INFO lines off while this route runs (restored)."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if was:
            tf_logging.enable_progress_bar()


def _write_tokenizer(hf_dir: Path, model: nn.Module, tokenizer) -> tuple[str, bool]:
    """Save a tokenizer into `hf_dir` for the builder; (where it came from, whether it is the placeholder)."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(hf_dir)
        return f"given ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})", False
    name = getattr(model.config, "_name_or_path", "") or ""
    if name:
        try:
            found = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # no tokenizer files there (random models, a folder saved without one)
            found = None
        if found is not None:
            found.save_pretrained(hf_dir)
            return f"the model's own ({name})", False
    _placeholder_tokenizer(model.config).save_pretrained(hf_dir)
    reloaded = AutoTokenizer.from_pretrained(str(hf_dir))  # as the builder will read it
    size = len(reloaded)
    vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", size))
    if size > vocab:
        raise ExportError(
            f"the placeholder tokenizer reloads with {size} tokens for a vocabulary of {vocab} "
            f"({type(reloaded).__name__} added {reloaded.all_special_tokens}); pass tokenizer= to the genai route"
        )
    return "placeholder (not saved)", True


def _placeholder_tokenizer(config):
    """A word-level tokenizer whose tokens are the vocabulary ids ("<17>"), special tokens at the config's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = int(text.vocab_size)
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def special(name):
        value = getattr(text, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        return f"<{value}>" if isinstance(value, int) and 0 <= value < size else None

    # Every special token named, inside the vocabulary: AutoTokenizer reloads the folder with the model type's
    # own tokenizer class, whose defaults (Qwen2's pad "<|endoftext|>") would otherwise be added as new ids.
    specials = {k: special(f"{k}_id") for k in ("bos_token", "eos_token", "pad_token")}
    specials["pad_token"] = specials["pad_token"] or specials["eos_token"] or "<0>"
    specials["bos_token"] = specials["bos_token"] or specials["eos_token"] or "<0>"
    specials["eos_token"] = specials["eos_token"] or "<0>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", **specials)


def _patch_config(hf_dir: Path, notes: list[str]) -> dict[str, str]:
    """Edit the saved config.json where the builder would read it differently from transformers; returns builder
    options the edits call for."""
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config") or config
    options: dict[str, str] = {}
    layers = text.get("num_hidden_layers")
    window = text.get("sliding_window")
    uses_window = text.get("use_sliding_window", True) is not False
    if isinstance(window, int) and window > 0 and uses_window and text.get("layer_types") is None and layers:
        text["layer_types"] = ["sliding_attention"] * layers
        notes.append(
            f"sliding window of {window} on every layer written as layer_types for the builder (it reads the "
            f"window from layer_types only)"
        )
    if any(t == "sliding_attention" for t in text.get("layer_types") or ()):
        options["windowed_kv_cache"] = "false"  # window-sized caches refuse batches of different prompt lengths
    rope = text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    original = text.get("original_max_position_embeddings")
    if (
        config.get("model_type") == "phi3"
        and original is not None
        and original != text.get("max_position_embeddings")
        and rope_type in (None, "default")
    ):
        text["original_max_position_embeddings"] = text.get("max_position_embeddings")
        notes.append(
            "Phi-3 without rope scaling: original_max_position_embeddings set to max_position_embeddings for the "
            "builder (it takes unequal values for LongRoPE)"
        )
    path.write_text(json.dumps(config, indent=2))
    return options


def _run_builder(
    hf_dir: Path, out: Path, cache: Path, precision: str, provider: str, options: dict, architecture: str
) -> str:
    from onnxruntime_genai.models import builder

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            items = [f"{k}={v}" for k, v in options.items()]
            extra = builder.parse_extra_options(None, str(hf_dir), str(out), precision, provider, str(cache), items)
            builder.create_model(None, str(hf_dir), str(out), precision, provider, str(cache), **extra)
    except NotImplementedError as exc:
        raise ExportError(
            f"onnxruntime-genai's model builder does not support {architecture} ({exc}). Use via='neat_fx' (the "
            f"default), which exports any model."
        ) from exc
    except Exception as exc:
        tail = "\n".join(log.getvalue().strip().splitlines()[-5:])
        raise ExportError(
            f"onnxruntime-genai's model builder failed on {architecture} at {precision}/{provider}: "
            f"{type(exc).__name__}: {exc}"
            + (f"\nbuilder output:\n{tail}" if tail else "")
            + "\nvia='neat_fx' (the default) exports the model with our exporter."
        ) from exc
    if not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        raise ExportError(f"the builder wrote no model.onnx / genai_config.json for {architecture}")
    return log.getvalue()


def _graph_facts(path: Path) -> tuple[dict[str, int], list[int]]:
    """Op counts of the built graph, and the MatMulNBits accuracy levels in it."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    levels = set()
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    levels.add(int(a.i))
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), sorted(levels)


# ---------------------------------------------------------------------------------------------------- verification


def _prompts(prompts, vocab: int, specials: set[int], limit: int) -> list[list[int]]:
    """The prompts to verify on, as lists of ids: at least two, of different lengths, each short enough that it
    and its new tokens fit the position table."""
    rows: list[list[int]] = []
    if prompts is None:
        g = torch.Generator().manual_seed(0)
        allowed = torch.tensor([i for i in range(vocab) if i not in specials])
        rows = [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in (9, 5)]
    else:
        ids, mask = prompts, None
        if isinstance(prompts, dict):
            ids, mask = prompts.get("input_ids"), prompts.get("attention_mask")
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(1, -1)
            keep = mask.reshape(ids.shape).bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids).bool()
            rows = [r[k].tolist() for r, k in zip(ids, keep)]
        elif isinstance(ids, (list, tuple)):
            rows = [list(map(int, r.tolist() if isinstance(r, torch.Tensor) else r)) for r in ids]
        rows = [r for r in rows if r][:2]
        if not rows:
            raise ConfigError("verification prompts: no input_ids rows (pass a 2-D tensor or a list of id lists)")
    rows = [r[-limit:] for r in rows]
    if len(rows) == 1 or len({len(r) for r in rows}) == 1:  # a second prompt of another length: the tail half
        rows.append(rows[0][-max(1, len(rows[0]) // 2) :] if len(rows[0]) > 1 else rows[0] * 2)
    return rows


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


@torch.no_grad()
def _verify(
    hf_dir,
    out,
    prompts,
    precision,
    provider,
    new_tokens,
    dtype,
    notes,
    *,
    reference=None,
    adapter=None,
    who="the merged model",
) -> dict:
    """Greedy tokens and prefill logits of `out` in onnxruntime-genai against `reference`'s own generate (default:
    the model saved in `hf_dir`). adapter: (an .onnx_adapter file, its name) to make active in onnxruntime-genai
    (genai_adapters.py); who: the reference, as the errors name it."""
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    if provider == "cuda" and not og.is_cuda_available():
        notes.append("not verified: this onnxruntime-genai has no CUDA (install onnxruntime-genai-cuda)")
        return {"skipped": "onnxruntime-genai without CUDA here"}
    genai_config = json.loads((out / "genai_config.json").read_text())
    meta = genai_config["model"]
    pad = int(
        meta.get("pad_token_id", 0) if not isinstance(meta.get("pad_token_id"), list) else meta["pad_token_id"][0]
    )
    eos = _ids(meta.get("eos_token_id"))
    if reference is None:
        reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    gen = reference.generation_config
    hf_eos = _ids(gen.eos_token_id) or eos
    limit = max(2, int(meta.get("context_length") or 2048) - new_tokens)
    specials = eos | hf_eos | _ids(gen.bos_token_id) | _ids(gen.pad_token_id) | {pad}
    rows = _prompts(prompts, int(meta["vocab_size"]), specials, limit)

    # the merged model's own generate: left-padded batch, KV cache, greedy
    width = max(map(len, rows))
    hf_pad = next(iter(_ids(gen.pad_token_id) or hf_eos or {0}))
    ids = torch.full((len(rows), width), hf_pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    out_hf = reference.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=sorted(hf_eos) or None,
        pad_token_id=hf_pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    hf_tokens = [_until_eos(out_hf.sequences[i, width:].tolist(), hf_eos) for i in range(len(rows))]
    hf_logits = out_hf.logits[0].float()  # (rows, vocab) at each prompt's last token
    del reference, out_hf
    gc.collect()

    # onnxruntime-genai: prompts of different lengths go in one batch padded on the RIGHT with its pad id (it
    # reads the pad id as "no token"); one prompt at a time where a prompt holds that id
    batched = 0 <= pad < int(meta["vocab_size"]) and all(pad not in r for r in rows)
    model = og.Model(str(out))
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[0]), adapter[1])
    label = f" with adapter {adapter[1]!r} active" if adapter is not None else ""
    try:
        groups = [list(range(len(rows)))] if batched else [[i] for i in range(len(rows))]
        og_tokens: list[list[int]] = [[] for _ in rows]
        og_logits = torch.empty_like(hf_logits)
        for group in groups:
            w = max(len(rows[i]) for i in group)
            batch = torch.full((len(group), w), pad, dtype=torch.int32)
            for j, i in enumerate(group):
                batch[j, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.int32)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=w + new_tokens, batch_size=len(group), do_sample=False)
            generator = og.Generator(model, params)
            if adapters is not None:
                generator.set_active_adapter(adapters, adapter[1])
            generator.append_tokens(batch.numpy())
            logits = torch.from_numpy(generator.get_logits().copy()).float().reshape(len(group), -1)
            while not generator.is_done():
                generator.generate_next_token()
            for j, i in enumerate(group):
                og_logits[i] = logits[j]
                og_tokens[i] = _until_eos(generator.get_sequence(j).tolist()[w:], eos)[:new_tokens]
            del generator, params
    finally:
        del adapters, model
    matches = total = 0
    first_divergence = None
    for a, b in zip(hf_tokens, og_tokens):
        n = max(len(a), len(b))
        same = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
        matches += sum(same)
        total += n
        if not all(same):
            step = same.index(False)
            first_divergence = step if first_divergence is None else min(first_divergence, step)
    diff = (og_logits - hf_logits).abs()
    scale = float(hf_logits.abs().max()) or 1.0
    result = {
        "prompt_lengths": [len(r) for r in rows],
        "new_tokens": new_tokens,
        "batched": batched,
        "tokens_equal": hf_tokens == og_tokens,
        "agreement": matches / total if total else 1.0,
        "first_divergence": first_divergence,
        "logits_max_abs": float(diff.max()),
        "logits_max_rel": float(diff.max()) / scale,
        "logits_min_corr": min(float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(og_logits, hf_logits)),
        "argmax_equal": bool((og_logits.argmax(-1) == hf_logits.argmax(-1)).all()),
        "hf_tokens": hf_tokens,
        "genai_tokens": og_tokens,
    }
    if not torch.isfinite(og_logits).all():
        raise ExportError(
            f"onnxruntime-genai gave non-finite logits for the {precision} model{label}; nothing was written"
        )
    if precision in EXACT:
        if not result["tokens_equal"] or result["logits_max_rel"] > EXACT[precision]:
            raise ExportError(
                f"verification failed: the {precision} genai model{label}: greedy tokens differ from {who}'s "
                f"own generate (first at step {first_divergence}; prefill logits max abs "
                f"{result['logits_max_abs']:.2e}, "
                f"{result['logits_max_rel']:.2e} of their scale); nothing was written. HF: {hf_tokens}, "
                f"genai: {og_tokens}"
            )
    elif not result["logits_min_corr"] >= GROSS:
        raise ExportError(
            f"verification failed: the {precision} genai model{label}: prefill logits correlate with {who}'s "
            f"by only {result['logits_min_corr']:.2f} (less than {GROSS}: a gross error, not quantization noise); "
            f"nothing was written"
        )
    return result


# ---------------------------------------------------------------------------------------------------- to_onnx


def precision_and_device(opts) -> tuple[str, str]:
    """The builder's precision (from dtype/quantize) and execution provider (from device) for `opts`."""
    device = opts.device
    if device == "auto":
        import onnxruntime_genai as og

        device = "cuda" if og.is_cuda_available() else "cpu"
    return opts.quantize or opts.dtype, device


def to_folder(module: nn.Module, example_inputs, path, opts, t_start: float) -> GenaiReport:
    """`to_onnx(..., via="genai")` without adapters (with them: genai_adapters.to_folder): `path` is the output
    folder; precision from dtype/quantize, provider from device."""
    precision, device = precision_and_device(opts)
    report = export(
        module,
        path,
        precision=precision,
        execution_provider=device,
        block_size=opts.block_size,
        verify=opts.verify,
        prompts=example_inputs,
    )
    report.seconds = time.perf_counter() - t_start
    return report
