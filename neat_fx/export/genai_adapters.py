"""`to_onnx(base, None, folder, via="genai", adapters={"a": nm_a, "b": "adapters/b"})`: one onnxruntime-genai base
model and one ONNX Runtime adapter file per NEAT adapter, switched at run time (onnxruntime-genai's `Adapters`).

    folder/model.onnx, model.onnx.data, genai_config.json   the base, built by onnxruntime-genai's model builder
    folder/adapters/<name>.onnx_adapter                     each adapter's LoRA matrices (onnxruntime.AdapterFormat)
    folder/neat_adapters.json                               the adapter names, files and the graph inputs they set

    model = GenaiAdapters(folder)                           # og.Model + og.Adapters, every adapter loaded once
    model.generate(prompt_ids, adapter="a", max_new_tokens=32)

What onnxruntime-genai (0.15+) offers and how this uses it:
- the builder's `adapter_path` option takes ONE PEFT LoRA folder and writes `x·A` and `(x·A)·(s·B)` MatMuls beside
  each adapted MatMul (it folds the scale s = lora_alpha / r into B, turns off the packed q/k/v and gate/up
  MatMuls), with the LoRA matrices as initializers named `….lora_A.MatMul.weight` / `….lora_B.MatMul.weight`;
- the runtime's `og.Adapters(model).load(file, name)` + `Generator.set_active_adapter(adapters, name)` feed an
  adapter file's tensors as the graph inputs of the same names.
A NEAT adapter is LoRA exactly at inference (`lora_A = Hᵀ`, H = σ(W0ᵀ A); `lora_B = B`; neat_fx/io/lora.py), so each
adapter is saved in that form and the builder run once per adapter (fp32): its LoRA initializers are that
adapter's tensors in the builder's own layout. The first build is the base: its LoRA initializers become graph
inputs (the rank axis symbolic, so adapters of different ranks fit) whose defaults are zeros, so with no adapter
active the folder IS the base model. With quantize="int4"/"int8" the base is built once more at that precision
with the LoRA MatMuls left out of the quantization (`nodes_to_exclude`): int4/int8 base weights, exact fp32
adapters (QLoRA's split).

Verified before anything is renamed into place, as the single genai export: greedy tokens of two prompts in
onnxruntime-genai with each adapter active against the merged model's (W0 + ΔW) own `generate`, and with none
active against the base model's; fp32 must be identical, int4/int8 only free of gross errors (genai_route._verify).
Refused with nothing written: names that cannot be file names, adapters computed on another base (the LoRA form's
base fingerprints), sites the LoRA form cannot express (save_adapters(format="lora") lists them), adapters that also
train parameters in full (an adapter file holds LoRA matrices only), adapters on the output head (the builder's LoRA
graph for the head is invalid) — all before the builder runs — and adapters of different sites (one base graph;
ranks may differ), found in the builds.

The adapter names go in `neat_adapters.json`, not in genai_config.json: onnxruntime-genai refuses a genai_config.json
with a field it does not know ('JSON Error: Unknown value "…"'), at the top level and in "model" alike.
"""

from __future__ import annotations

import gc
import hashlib
import json
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
from neat_fx.errors import AdapterMismatchError, ConfigError

from . import genai_route as gr
from . import merged
from .onnx_export import ExportError

MANIFEST = "neat_adapters.json"
MANIFEST_FORMAT = "neat_fx genai adapters"
ADAPTER_DIR = "adapters"
SUFFIX = ".onnx_adapter"
#: the symbolic name of the rank axis of the LoRA inputs (adapters of different ranks feed the same graph)
RANK = "lora_rank"
#: precisions with adapters: the LoRA MatMuls stay fp32 (float initializers a feed can replace) in every one
PRECISIONS = ("fp32", "int8", "int4")
#: adapter names become file names: letters, digits, '.', '_', '-', starting with a letter or digit
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def is_lora_tensor(name: str) -> bool:
    """Whether a builder initializer is an adapter's LoRA matrix (`….lora_A.MatMul.weight`, `….lora_B.…`)."""
    return ".lora_A." in name or ".lora_B." in name


def _rank_axis(name: str) -> int:
    # the builder stores MatMul weights as (in, out): lora_A (d_in, r), lora_B (r, d_out)
    return 1 if ".lora_A." in name else 0


@dataclass
class GenaiAdaptersReport(gr.GenaiReport):
    """What `to_onnx(..., via="genai", adapters=...)` produced and checked. `verification` maps each adapter name
    to genai_route._verify's result with that adapter active; `base_verification` is the one with none active."""

    adapters: dict[str, Path] = field(default_factory=dict)  # name → its .onnx_adapter file
    adapter_inputs: list[str] = field(default_factory=list)  # the base graph's LoRA inputs
    base_verification: dict = field(default_factory=dict)

    @property
    def tokens_equal(self) -> bool | None:
        results = [v for v in [self.base_verification, *self.verification.values()] if v and not v.get("skipped")]
        return all(v["tokens_equal"] for v in results) if results else None

    @property
    def max_rel_diff(self) -> float:
        results = [v for v in [self.base_verification, *self.verification.values()] if "logits_max_rel" in v]
        return max((float(v["logits_max_rel"]) for v in results), default=float("nan"))

    def __str__(self) -> str:
        quant = f", block {self.block_size}, adapters fp32" if self.block_size else ""
        lines = [
            f"genai folder {self.path} ({self.size_bytes / 2**20:.1f} MB: {', '.join(self.files)})",
            f"model        {self.architecture}, {self.precision} for {self.execution_provider}{quant}",
            f"adapters     {len(self.adapters)} ({', '.join(self.adapters)}) in {ADAPTER_DIR}/, "
            f"{len(self.adapter_inputs)} LoRA inputs",
        ]
        for who, v in [("(none)", self.base_verification), *self.verification.items()]:
            if v.get("skipped"):
                lines.append(f"verification {who}: skipped: {v['skipped']}")
            elif v:
                outcome = "identical tokens" if v["tokens_equal"] else f"token agreement {v['agreement']:.1%}"
                lines.append(f"verification {who}: {outcome}, prefill logits {v['logits_max_rel']:.2e} of their scale")
        lines += [f"note         {n}" for n in self.notes]
        lines.append(f"took         {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- inputs


def _base_model(module: nn.Module) -> nn.Module:
    """The untouched Hugging Face model the adapters sit on: `module` itself, or a NeatModule's base."""
    if isinstance(module, FoldedModule):
        raise ConfigError(
            "to_onnx(..., via='genai', adapters=...) takes the base model (or a NeatModule, whose base is used): a "
            "folded model has one adapter merged into its weights. Pass the model the adapters were trained on"
        )
    return module.model if isinstance(module, NeatModule) else module


def _named(adapters) -> dict[str, object]:
    """{name: NeatModule or folder}, every name usable as a file name."""
    if isinstance(adapters, (str, os.PathLike, NeatModule)) or not isinstance(adapters, (dict, list, tuple)):
        raise ConfigError(
            f"adapters= takes {{name: NeatModule or saved adapter folder}} (or a list of folders, named after "
            f"them), got {type(adapters).__name__}: e.g. adapters={{'a': nm_a, 'b': 'adapters/b'}}"
        )
    if isinstance(adapters, dict):
        named = dict(adapters)
    else:
        named = {}
        for value in adapters:
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(
                    f"a list in adapters= holds folders (each named after its folder); got a "
                    f"{type(value).__name__}: pass a dict {{name: adapter}} to name it"
                )
            named[Path(value).name] = value
    if not named:
        raise ConfigError("adapters= is empty; pass at least one adapter: {name: NeatModule or saved folder}")
    seen: dict[str, str] = {}
    for name, value in named.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"adapter name {name!r} cannot name a file ({ADAPTER_DIR}/<name>{SUFFIX}): use 1-64 letters, "
                f"digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name.lower() in seen:  # one file on case-insensitive file systems
            raise ConfigError(f"adapter names {seen[name.lower()]!r} and {name!r} differ only in case; rename one")
        seen[name.lower()] = name
        if not isinstance(value, (NeatModule, str, os.PathLike)):
            raise ConfigError(
                f"adapter {name!r}: expected a NeatModule or a folder saved by neat_fx.save_adapters, got "
                f"{type(value).__name__}"
            )
    return named


def _neat_module(base: nn.Module, name: str, value, example) -> NeatModule:
    """The adapter as a NeatModule on `base`: itself, or the saved folder loaded onto a transform of `base` (which
    checks every site and base-weight fingerprint)."""
    if isinstance(value, NeatModule):
        return value
    import neat_fx

    try:
        return neat_fx.load_adapters(base, value, example)
    except (AdapterMismatchError, FileNotFoundError) as exc:
        raise AdapterMismatchError(f"adapter {name!r} ({value}): {exc}") from exc


def _lora_form(nm: NeatModule, name: str, base: nn.Module, folder: Path) -> Path:
    """Save `nm` in its exact LoRA form into `folder` (refused, by save_adapters, for sites LoRA cannot express) and
    check it was computed on `base`'s weights."""
    import neat_fx
    from neat_fx.io import lora

    if nm.trainable_names:
        raise ConfigError(
            f"adapter {name!r} also trains parameters in full ({', '.join(sorted(nm.trainable_names.values()))}): an "
            f"adapter file carries LoRA matrices only, and the builder would write those parameters into the base. "
            f"Export it on its own: to_onnx(nm, None, folder, via='genai')"
        )
    try:
        neat_fx.save_adapters(nm, folder, format="lora")
        lora.check_base(folder, base)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(
            f"adapter {name!r} cannot be served on this base in LoRA form: {exc}".replace(str(folder), "its LoRA form")
        ) from exc
    head = next((n for n, m in base.named_modules() if m is base.get_output_embeddings()), None)
    targets = json.loads((folder / "adapter_config.json").read_text()).get("target_modules") or []
    if head and head in targets:
        # onnxruntime-genai 0.18's builder writes an invalid graph for LoRA on the head ("Node input
        # '/lm_head/MatMul/output_0' is not … output of a previous node"), tied to the embedding or not
        raise ConfigError(
            f"adapter {name!r} adapts the output head ({head}), which onnxruntime-genai's builder cannot take in LoRA "
            f"form. Transform without it (targets 'all-linear' leave the head out), or export this adapter on its "
            f"own, merged: to_onnx(nm, None, folder, via='genai')"
        )
    return folder


# ---------------------------------------------------------------------------------------------------- graph


def _lora_tensors(model_path: Path) -> dict:
    """The LoRA initializers of a built model (name → NumPy array), reading only their bytes of the data file."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    proto = onnx.load(str(model_path), load_external_data=False)
    out = {}
    for t in proto.graph.initializer:
        if is_lora_tensor(t.name):
            if external_data_helper.uses_external_data(t):
                external_data_helper.load_external_data_for_tensor(t, str(model_path.parent))
            out[t.name] = numpy_helper.to_array(t).copy()
    return out


def _lora_nodes(model_path: Path) -> list[str]:
    """The names of the LoRA MatMul nodes (what `nodes_to_exclude` keeps out of int4/int8 quantization)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return [
        n.name for n in proto.graph.node if n.op_type == "MatMul" and ("/lora_A/" in n.name or "/lora_B/" in n.name)
    ]


def _lift(model_path: Path, names: set[str]) -> list[str]:
    """Turn the LoRA initializers `names` into graph inputs with zero defaults (no adapter active = the base model)
    and a symbolic rank axis. The other tensors stay in the data file, untouched (only model.onnx is rewritten)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model_path), load_external_data=False)
    declared = {i.name for i in proto.graph.input}
    lifted = []
    for t in proto.graph.initializer:
        if t.name not in names:
            continue
        dims = list(t.dims)
        zeros = np.zeros(dims, dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
        t.CopyFrom(numpy_helper.from_array(zeros, t.name))  # inline: the data file's bytes of it go unread
        if t.name not in declared:
            shape = [RANK if k == _rank_axis(t.name) else d for k, d in enumerate(dims)]
            proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, shape))
        lifted.append(t.name)
    onnx.save(proto, str(model_path))
    return lifted


def _write_adapter(path: Path, tensors: dict, tag: int):
    from . import runtime

    ort = runtime._ort()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(tag)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(path))
    back = ort.AdapterFormat.read_adapter(str(path))
    if set(back.get_parameters()) != set(tensors) or back.get_model_version() != tag:
        raise ExportError(f"the adapter file {path.name} did not read back what was written; nothing was written")


def _check_same_sites(per_adapter: dict[str, dict]):
    """Every adapter sets the same LoRA tensors, of the same shapes but for the rank: one base graph serves them."""
    first, *rest = per_adapter
    want = per_adapter[first]
    for name in rest:
        have = per_adapter[name]
        if set(have) != set(want):
            extra = sorted(set(have) - set(want))[:3]
            missing = sorted(set(want) - set(have))[:3]
            raise AdapterMismatchError(
                f"adapters {first!r} and {name!r} adapt different sites (only {name!r}: {extra or 'none'}; only "
                f"{first!r}: {missing or 'none'}): one base graph serves adapters of the same sites. Transform "
                f"every adapter with the same targets, or export them in separate folders"
            )
        for k, v in have.items():
            a, b = list(v.shape), list(want[k].shape)
            a[_rank_axis(k)] = b[_rank_axis(k)] = 0
            if a != b:
                raise AdapterMismatchError(
                    f"adapters {first!r} and {name!r} give {k} shapes {list(want[k].shape)} and {list(v.shape)}; "
                    f"expected the same but for the rank: were they trained on the same base model?"
                )


# ---------------------------------------------------------------------------------------------------- export


def export(
    module: nn.Module,
    folder,
    adapters,
    *,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    block_size: int = 32,
    accuracy_level: int | None = None,
    verify: bool = True,
    prompts=None,
    tokenizer=None,
    builder_options: dict | None = None,
    new_tokens: int = gr.NEW_TOKENS,
) -> GenaiAdaptersReport:
    """Build one onnxruntime-genai base folder at `folder` from `module` (the base model, or a NeatModule whose base
    is used) with one adapter file per entry of `adapters` ({name: NeatModule or folder saved by save_adapters}, or a
    list of folders named after them). Options as genai_route.export; precision "fp32", "int8" or "int4" (the base
    weights; the adapters stay fp32). Written whole (renamed into place) or not at all."""
    t_start = time.perf_counter()
    ok, why = gr.available()
    if not ok:
        raise ExportError(why)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"with adapters= the genai route builds {', '.join(map(repr, PRECISIONS))} (the base weights; the "
            f"adapters' LoRA matrices stay fp32); got {precision!r}"
        )
    gr.check_options(precision, execution_provider, block_size, accuracy_level, builder_options)
    if "adapter_path" in (builder_options or {}):
        raise ConfigError("builder_options: adapter_path is set by adapters=; leave it out")
    named = _named(adapters)
    folder = Path(folder)
    gr._check_destination(folder)
    base = _base_model(module)
    architecture = gr._check_family(base)

    notes: list[str] = []
    options: dict[str, str] = {}
    quantized = precision != "fp32"
    if quantized:
        options["block_size"] = str(block_size)
        if accuracy_level is not None:
            options["accuracy_level"] = str(accuracy_level)
    flags = [(p, p.requires_grad) for p in base.parameters()]  # loading a folder transforms (freezes) the base
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".hf", dir=folder.parent))
    try:
        with gr._quiet():
            result = _build(
                base, named, stage, scratch, tokenizer, options, builder_options, precision, execution_provider,
                architecture, verify, prompts, new_tokens, notes,
            )  # fmt: skip
        fsync_tree(stage)
        os.replace(stage, folder)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    tokenizer_source, ops, levels, inputs, verifications, base_verification = result
    return GenaiAdaptersReport(
        path=folder,
        size_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        precision=precision,
        execution_provider=execution_provider,
        architecture=architecture,
        block_size=block_size if quantized else None,
        accuracy_level=(levels[0] if len(levels) == 1 else None) if quantized else None,
        files=sorted(p.name for p in folder.iterdir()),
        op_counts=ops,
        verification=verifications,
        tokenizer=tokenizer_source,
        builder_options=options,
        seconds=time.perf_counter() - t_start,
        notes=notes,
        adapters={n: folder / ADAPTER_DIR / f"{n}{SUFFIX}" for n in named},
        adapter_inputs=inputs,
        base_verification=base_verification,
    )


def _example(base: nn.Module, prompts) -> dict:
    """Inputs to transform `base` with when a saved folder is loaded onto it: the first verification prompt."""
    config = base.config.get_text_config(decoder=True)
    rows = gr._prompts(prompts, int(config.vocab_size), set(), 64)
    width = min(map(len, rows))  # two rows: a batch of one would specialise the batch axis of the capture
    ids = torch.tensor([r[:width] for r in rows[:2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _build(
    base, named, stage, scratch, tokenizer, options, builder_options, precision, provider, architecture, verify,
    prompts, new_tokens, notes,
):  # fmt: skip
    # every adapter checked and in LoRA form before the builder runs
    nms = {name: _neat_module(base, name, value, _example(base, prompts)) for name, value in named.items()}
    loras = {name: _lora_form(nm, name, base, scratch / "lora" / name) for name, nm in nms.items()}

    hf_dir = scratch / "hf"
    base.save_pretrained(hf_dir)
    reference_dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), torch.float32)
    tokenizer_source, placeholder = gr._write_tokenizer(hf_dir, base, tokenizer)
    options.update(gr._patch_config(hf_dir, notes))
    options.update({str(k): str(v) for k, v in (builder_options or {}).items()})
    fp32_options = {k: v for k, v in options.items() if k not in ("block_size", "accuracy_level")}

    # one fp32 build per adapter: its LoRA tensors as the builder lays them out (transposed, s folded into B);
    # the first one is the base (fp32), or tells which MatMuls the quantized base build must leave in fp32
    per_adapter: dict[str, dict] = {}
    first = stage if precision == "fp32" else scratch / "first"
    for i, (name, lora_dir) in enumerate(loras.items()):
        out = first if i == 0 else scratch / "built"
        gr._run_builder(
            hf_dir, out, scratch / "cache", "fp32", provider, {**fp32_options, "adapter_path": str(lora_dir)},
            architecture,
        )  # fmt: skip
        per_adapter[name] = _lora_tensors(out / "model.onnx")
        if not per_adapter[name]:
            raise ExportError(
                f"the builder wrote no LoRA matrices for adapter {name!r} ({architecture}): this builder does not "
                f"take adapter_path for the family; export each adapter on its own with to_onnx(nm, None, folder, "
                f"via='genai')"
            )
        if i:
            shutil.rmtree(out)
    _check_same_sites(per_adapter)
    if precision != "fp32":
        excluded = _lora_nodes(first / "model.onnx")
        quant_options = {**options, "adapter_path": str(next(iter(loras.values())))}
        quant_options["nodes_to_exclude"] = ",".join(
            filter(None, [quant_options.get("nodes_to_exclude", ""), *excluded])
        )
        gr._run_builder(hf_dir, stage, scratch / "cache", precision, provider, quant_options, architecture)
        shutil.rmtree(first)
        if set(_lora_tensors(stage / "model.onnx")) != set(next(iter(per_adapter.values()))):
            raise ExportError(
                f"the {precision} build did not keep the LoRA matrices as float initializers; nothing was written"
            )
    if placeholder:
        for f in gr.PLACEHOLDER_FILES:
            (stage / f).unlink(missing_ok=True)
        notes.append(
            "no tokenizer found: the builder ran with a placeholder over the vocabulary ids, left out of the "
            "folder; onnxruntime-genai generates from token ids"
        )

    names = set(next(iter(per_adapter.values())))
    inputs = _lift(stage / "model.onnx", names)
    base_fp = _base_fingerprint(loras, inputs, per_adapter)
    (stage / ADAPTER_DIR).mkdir()
    files = {}
    for name, tensors in per_adapter.items():
        files[name] = f"{ADAPTER_DIR}/{name}{SUFFIX}"
        _write_adapter(stage / files[name], tensors, _tag(base_fp, name))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "precision": precision,
        "base_fingerprint": base_fp,
        "adapters": files,
        "inputs": sorted(inputs),
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
    ops, levels = gr._graph_facts(stage / "model.onnx")
    del per_adapter
    gc.collect()

    verifications: dict[str, dict] = {}
    base_verification: dict = {}
    if verify:
        base_verification = gr._verify(
            hf_dir, stage, prompts, precision, provider, new_tokens, reference_dtype, notes, who="the base model"
        )
        for name, nm in nms.items():
            reference = merged.merged_copy(nm, route="via='genai'")
            verifications[name] = gr._verify(
                hf_dir, stage, prompts, precision, provider, new_tokens, reference_dtype, notes,
                reference=reference, adapter=(stage / files[name], name),
                who=f"the merged model of adapter {name!r}",
            )  # fmt: skip
            del reference
            gc.collect()
    return tokenizer_source, ops, levels, inputs, verifications, base_verification


def _base_fingerprint(loras: dict[str, Path], inputs: list[str], per_adapter: dict) -> str:
    """What the adapter files are valid for: the base weights (our fingerprints, from the LoRA form) and the graph
    inputs they set. A hex digest."""
    from neat_fx.io import lora

    first = next(iter(loras.values()))
    fingerprints = (lora.read_base(first) or {}).get("fingerprints", {})
    tensors = next(iter(per_adapter.values()))
    shapes = {n: [d for k, d in enumerate(tensors[n].shape) if k != _rank_axis(n)] for n in inputs}
    text = json.dumps({"base": fingerprints, "inputs": shapes}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _tag(base_fp: str, name: str) -> int:
    from . import runtime

    return runtime.adapter_tag(base_fp, name)


def to_folder(module: nn.Module, example_inputs, path, opts, precision: str, device: str) -> GenaiAdaptersReport:
    """`to_onnx(..., via="genai", adapters=...)`."""
    return export(
        module,
        path,
        opts.adapters,
        precision=precision,
        execution_provider=device,
        block_size=opts.block_size,
        verify=opts.verify,
        prompts=example_inputs,
    )


# ---------------------------------------------------------------------------------------------------- serving


def read_manifest(folder) -> dict:
    """The adapters an export of ours recorded in `folder` ({name: file relative to the folder} under "adapters")."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {folder} is not a genai folder exported with adapters= (to_onnx(base, None, "
            f"folder, via='genai', adapters={{...}}))"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON ({exc}); export the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path} is not a {MANIFEST_FORMAT!r} manifest; export the folder again")
    return manifest


class GenaiAdapters:
    """A genai folder exported with adapters=, loaded once (og.Model + og.Adapters, every adapter file loaded):
    generate with any adapter, or none (the base model), switching between calls.

        model = GenaiAdapters("qwen-adapters/")
        model.generate([5, 17, 42], adapter="a", max_new_tokens=32)   # new token ids, greedy
    """

    def __init__(self, folder):
        import onnxruntime_genai as og

        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.model = og.Model(str(self.folder))
        self.adapters = og.Adapters(self.model)
        from . import runtime

        for name, rel in manifest["adapters"].items():
            path = self.folder / rel
            if runtime.recorded_tag(path) != _tag(manifest.get("base_fingerprint", ""), name):
                raise AdapterMismatchError(
                    f"{path} is not the adapter file of {name!r} for this folder's base model (another export wrote "
                    f"it, or it is not an ONNX Runtime adapter file); export the folder again"
                )
            self.adapters.load(str(path), name)
        self.names = tuple(manifest["adapters"])
        meta = json.loads((self.folder / "genai_config.json").read_text())["model"]
        self._eos = gr._ids(meta.get("eos_token_id"))

    def generate(self, input_ids, adapter: str | None = None, max_new_tokens: int = 32, **search) -> list:
        """New tokens after `input_ids` (one prompt: a 1-D sequence; or a 2-D batch of equal-length rows, then one
        list per row), with `adapter` active (None: the base model). Greedy unless `search` says otherwise
        (onnxruntime-genai's search options, e.g. do_sample=True, top_k=50); ends before the first eos id."""
        import numpy as np
        import onnxruntime_genai as og

        if adapter is not None and adapter not in self.names:
            raise ConfigError(f"no adapter {adapter!r} in {self.folder}; it has {', '.join(map(repr, self.names))}")
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int32)
        rows = ids.reshape(1, -1) if ids.ndim == 1 else ids
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            **{"do_sample": False, **search, "max_length": rows.shape[1] + max_new_tokens, "batch_size": len(rows)}
        )
        generator = og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(rows)
        while not generator.is_done():
            generator.generate_next_token()
        out = [gr._until_eos(generator.get_sequence(i).tolist()[rows.shape[1] :], self._eos) for i in range(len(rows))]
        return out[0] if ids.ndim == 1 else out
