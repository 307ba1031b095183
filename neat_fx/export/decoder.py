"""`to_onnx(..., task="text-generation-with-past")`: a decoder LM as one ONNX file that serves both prefill (past
length 0) and each cached decode step, with the input/output names Optimum uses (so existing runners recognise
it): `input_ids`, `attention_mask`, `position_ids` (where the model takes them), `past_key_values.{i}.key/.value`
→ `logits`, `present.{i}.key/.value`; batch, sequence and past length dynamic.

The captured graphs of a NeatModule are cache-free, so the export runs the model's own code (its cache class,
masks, rotary tables, sliding windows) with the adapted weights W0 + ΔW swapped in, exactly as
`neat_fx.generate` does; the cache's layout (layers, key/value heads, head size, dtype) is read from one probe
call of the model rather than from config field names, which differ per family. Verified by logits on a
prefill and a decode step, then by greedy generation through ONNX Runtime against the model's own `generate`.
(docs/design.md, "Decoder LLMs → ONNX")
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neat_fx import capture as cap
from neat_fx.atomic import Staging
from neat_fx.containers import FoldedModule, NeatModule
from neat_fx.numerics import compare

from . import generation, gqa, runtime
from . import onnx_export as oe
from .config import TEXT_GENERATION_WITH_PAST, ExportConfig

log = logging.getLogger("neat_fx.export")

TASK = TEXT_GENERATION_WITH_PAST
#: a past length for tracing: not 0 or 1, which torch.export would specialise on
EXAMPLE_PAST = 3
#: new tokens of the verification by generation (two prompts of different lengths in one batch)
VERIFY_NEW_TOKENS = 16
#: logits tolerance (of each output's scale) per precision; int8/int4 change the numbers by design: they are
#: checked only against a broken model (QUANTIZED_MIN_COSINE), their drift and token agreement are reported
LOGITS_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.5, "int4": 0.5}
#: the least cosine similarity of each quantized output (logits, keys, values) to PyTorch's: the random
#: Qwen2.5-0.5B shape gives 0.993 (int8) / 0.889 (int4) (benchmarks/results/decoder_onnx.json); unrelated outputs ≈ 0
QUANTIZED_MIN_COSINE = 0.7
#: a greedy step whose top-2 logits are closer than this (of the logits' scale) is a tie: fp32 may pick either
TIE_MARGIN = 1e-4
META_PREFIX = "neat_fx.generation."


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache of a decoder, as one probe call of the model produced it."""

    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    value_dims: tuple[int, ...]
    dtype: torch.dtype
    position_ids: bool

    @property
    def layers(self) -> int:
        return len(self.kv_heads)

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
        return names + [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def empty_past(self, batch: int, length: int, device="cpu", dtype=None) -> list[torch.Tensor]:
        out = []
        for h, dk, dv in zip(self.kv_heads, self.head_dims, self.value_dims):
            for d in (dk, dv):
                out.append(torch.zeros(batch, h, length, d, dtype=dtype or self.dtype, device=device))
        return out


#: the forward's cache argument: `cache` from transformers 5.2x, `past_key_values` before
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_ARGUMENTS if n in params), None)


def returned_cache(out):
    return next((getattr(out, n) for n in CACHE_ARGUMENTS if getattr(out, n, None) is not None), None)


def cache_tensors(cache) -> list[tuple] | None:
    """[(keys, values)] per layer of a transformers cache (`.layers` from 4.56, `key_cache`/`value_cache`
    lists before), or None if it holds no such tensors."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(la, "keys", None), getattr(la, "values", None)) for la in layers]
    elif isinstance(getattr(cache, "key_cache", None), list):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        return None
    ok = pairs and all(isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) for k, v in pairs)
    return pairs if ok else None


class WithPast(nn.Module):
    """The model's forward with a cache given as flat tensors and returned as flat tensors, the adapted weights
    in place of the model's own (held here as buffers, so the exporter takes them as the file's constants).
    `model` is a view of the model (neat_fx.generate.adapted_view): tracing swaps tensors in the view's tables,
    never in the model's, and each call runs a view of it with the adapted buffers in place.

    `fast` (a gqa.Plan): its layers run as GroupQueryAttention / RotaryEmbedding with packed projections (held
    here as buffers too); `last_logits`: logits at the last position only. `reference()` runs the model's own
    code instead of the fast layers (what the export is verified against)."""

    def __init__(
        self,
        model: nn.Module,
        weights: dict[str, torch.Tensor],
        layout: CacheLayout,
        *,
        fast: gqa.Plan | None = None,
        last_logits: bool = False,
    ):
        from neat_fx.generate import adapted_view

        super().__init__()
        self.model = adapted_view(model, {})
        self.layout = layout
        self._cache_arg = cache_argument(model)
        self.last_logits = last_logits and "logits_to_keep" in inspect.signature(model.forward).parameters
        self.plan = fast if fast is not None and fast.fast else None
        self._use_fast = self.plan is not None
        # one buffer per tensor: a head tied to the embedding stays one constant in the file
        slots: dict[int, int] = {}
        self._slots = {}
        for path, w in weights.items():
            if id(w) not in slots:
                slots[id(w)] = len(slots)
                self.register_buffer(f"adapted_{slots[id(w)]}", w.detach(), persistent=False)
            self._slots[path] = slots[id(w)]
        self._packed = {}
        if self.plan is not None:
            for j, (key, (w, b)) in enumerate(gqa.packed_weights(model, weights, self.plan).items()):
                self.register_buffer(f"packed_{j}_weight", w, persistent=False)
                self.register_buffer(f"packed_{j}_bias", b, persistent=False)
                self._packed[key] = j
            attn = model.get_submodule(next(la.attention for la in self.plan.layers if la.fast))
            length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            cos, sin = gqa.rotary_tables(model.get_submodule(self.plan.rotary), attn.head_dim, length, device)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    @contextlib.contextmanager
    def reference(self):
        """Within: the model's own code on every layer (the fast layers' reference)."""
        use, self._use_fast = self._use_fast, False
        try:
            yield self
        finally:
            self._use_fast = use

    def forward(self, input_ids, attention_mask, *rest):
        from transformers.cache_utils import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.layout.position_ids else (None, rest)
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)])
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, self._cache_arg: cache, "use_cache": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.last_logits:
            kwargs["logits_to_keep"] = 1
        view = self.adapted()
        ctx = None
        if self._use_fast:
            ctx = gqa.Context(attention_mask, position_ids, past, self.rotary_cos, self.rotary_sin, self.layout.dtype)
            packed = {
                k: (getattr(self, f"packed_{j}_weight"), getattr(self, f"packed_{j}_bias"))
                for k, j in self._packed.items()
            }
            gqa.install(view, self.plan, ctx, packed)
        out = view(**kwargs)
        pairs = cache_tensors(returned_cache(out))
        present = [t for i, pair in enumerate(pairs) for t in (ctx.present.get(i, pair) if ctx else pair)]
        return (out.logits, *present)

    def adapted(self) -> nn.Module:
        """The model computing with this wrapper's adapted tensors (as they are now: fakes while tracing)."""
        from neat_fx.generate import adapted_view

        return adapted_view(self.model, {p: getattr(self, f"adapted_{i}") for p, i in self._slots.items()})


def source(module: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor], bool]:
    """(the Hugging Face model whose code runs, the adapted weights by attribute path, whether a NeatModule was
    folded for it)."""
    from neat_fx.generate import adapted_weights, source_model

    if isinstance(module, (NeatModule, FoldedModule)):
        model = source_model(module)
        if isinstance(module, FoldedModule) and module.__dict__.get("_source_model") is None:
            raise oe.ExportError(
                f"task={TASK!r} runs the model's own cached forward, but this folded module has no source model "
                f"(it was captured from a plain graph). Fold a NeatModule of a Hugging Face decoder, or export "
                f"with task=None (every step recomputes the whole sequence)."
            )
        return model, adapted_weights(module), isinstance(module, NeatModule)
    return module, {}, False


def check_decoder(model: nn.Module):
    """Refuse what cannot run with a cache: encoders, classifiers, home-grown modules without an HF cache."""
    can = getattr(model, "can_generate", None)
    takes_past = cache_argument(model) is not None
    if not (callable(can) and can()) or not takes_past:
        why = (
            "it has no generation head (an encoder or a classifier)"
            if not (callable(can) and can())
            else "its forward takes no cache / past_key_values"
        )
        raise oe.ExportError(
            f"task={TASK!r} exports a decoder language model with a key/value cache; {type(model).__name__} "
            f"cannot run with one ({why}). Export it with task=None (the default), or pass a Hugging Face "
            f"…ForCausalLM / …LMHeadModel (or a NeatModule / fold() of one)."
        )


def probe_layout(model: nn.Module, weights: dict, input_ids: torch.Tensor) -> CacheLayout:
    """Run the model once with a cache and read the cache's layout from what it returns."""
    from neat_fx.generate import adapted_view

    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    ids = input_ids[:1, :2]
    with torch.no_grad():
        out = adapted_view(model, weights)(input_ids=ids, use_cache=True)
    cache = returned_cache(out)
    layers = cache_tensors(cache)
    if not layers:
        raise oe.ExportError(
            f"{type(model).__name__} returned no key/value cache for use_cache=True (got "
            f"{type(cache).__name__}); task={TASK!r} needs a model that fills a transformers DynamicCache. Export "
            f"with task=None instead."
        )
    if any(k.dim() != 4 or v.dim() != 4 for k, v in layers):
        raise oe.ExportError(
            f"{type(model).__name__}'s cache is not laid out as [batch, heads, length, head size] per layer; "
            f"task={TASK!r} supports that layout only. Export with task=None instead."
        )
    return CacheLayout(
        kv_heads=tuple(k.shape[1] for k, _ in layers),
        head_dims=tuple(k.shape[3] for k, _ in layers),
        value_dims=tuple(v.shape[3] for _, v in layers),
        dtype=layers[0][0].dtype,
        position_ids=takes_positions,
    )


def positions(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last `length` tokens of left-padded rows (padding at position 0, as HF's generate)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def _example(layout: CacheLayout, input_ids: torch.Tensor, device) -> tuple:
    """Tracing inputs: batch 2, at least 2 new tokens, EXAMPLE_PAST cached ones (sizes torch.export keeps
    symbolic), built from the user's example ids."""
    ids = input_ids.to(device)
    ids = ids.repeat(2, 1)[:2] if ids.shape[0] < 2 else ids[:2]
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 2)
    mask = torch.ones(2, EXAMPLE_PAST + ids.shape[1], dtype=torch.long, device=device)
    args = [ids, mask]
    if layout.position_ids:
        args.append(positions(mask, ids.shape[1]))
    g = torch.Generator(device="cpu").manual_seed(0)
    past = [torch.randn(t.shape, generator=g).to(device=device, dtype=t.dtype) for t in layout.empty_past(2, 3)]
    return tuple(args + past)


def _dynamic_shapes(layout: CacheLayout) -> tuple:
    from torch.export import Dim

    batch, seq = Dim("batch_size"), Dim("sequence_length")
    past, total = Dim("past_sequence_length"), Dim("total_sequence_length")
    rest = ([{0: batch, 1: seq}] if layout.position_ids else []) + [{0: batch, 2: past}] * (2 * layout.layers)
    return ({0: batch, 1: seq}, {0: batch, 1: total}, tuple(rest))  # forward(input_ids, attention_mask, *rest)


def export(module: nn.Module, example_inputs, path: Path, opts: ExportConfig, device: str, t_start: float):
    """The with-past export of `module` to `path` (see the module's docstring)."""
    import onnx

    model, weights, folded_first = source(module)
    check_decoder(model)
    oe.check_int4_weights(model, opts)
    args, kwargs = cap.split_example_inputs(example_inputs)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise oe.ExportError(
            f"task={TASK!r} builds its inputs from the example's input_ids (a [batch, length] integer tensor); "
            f"the example has none. Pass example_inputs=dict(input_ids=…, attention_mask=…)."
        )
    # ids outside the vocabulary (a tokenizer's padding: GPT-2's 50256 on a smaller table) carry no token; the
    # export reads only the example's shapes and builds its verification prompts from it
    input_ids = torch.where(in_vocabulary(input_ids, vocab_size(model)), input_ids, _pad_id(model))
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    layout = probe_layout(model, weights, input_ids.to(model_device))
    fast = gqa.plan(model, layout.position_ids) if opts.attention == "auto" else None
    wrapper = WithPast(model, weights, layout, fast=fast, last_logits=opts.logits == "last").eval()
    example = _example(layout, input_ids, model_device)
    clock = _Clock(t_start)
    clock.lap("probe and wrapper")
    program = _torch_export(wrapper, example, layout, opts)  # the wrapper runs a view, in eval mode
    clock.lap("torch.export + ONNX translation + exporter optimiser")
    meta = dict(oe._metadata(opts), **_generation_metadata(model, layout))
    meta["neat_fx.export.task"] = TASK
    if wrapper.plan is not None and all(la.fast for la in wrapper.plan.layers):
        # every present.* comes from GroupQueryAttention, which appends in place when the runner binds one buffer
        # as both past and present (generation.py); other graphs concatenate and need a fresh output each step
        meta[META_PREFIX + "cache_in_place"] = "1"
    if wrapper.plan is not None:  # GroupQueryAttention reads the cos/sin table by position: no row past its end
        meta[META_PREFIX + "max_positions"] = str(int(wrapper.rotary_cos.shape[0]))
    fuse = opts.optimize in ("auto", "fusions")  # decoder fusions pay on CPU too (RMSNorm, rotary, attention)
    proto, done = _proto(onnx, program, opts, device, fuse, meta)
    clock.lap("fusions + serialisation")
    fusion_failed = None
    external = oe._proto_bytes(proto) > oe.EXTERNAL_DATA_ABOVE
    final_data = path.with_name(path.name + ".data")
    with Staging() as st:
        tmp = st.path(path, ".onnx")
        tmp_data = tmp.with_name(tmp.name + ".data")
        st.add(tmp_data, final_data, optional=True)
        oe._save(onnx, proto, tmp, tmp_data, external)
        del proto
        clock.lap("save")
        # ONNX Runtime loads the file in its offline optimisation: that is the check that it takes the fused graph
        # (else an explicit load)
        offline = opts.optimize in ("auto", "fusions") and not external
        try:
            if not offline:
                runtime.session(tmp, device).get_inputs()
            done += oe._post_process(onnx, tmp, tmp_data, external, opts, device, meta, resave_metadata=False)
        except oe.ExportError:
            raise
        except Exception as exc:  # a fusion the runtime refuses: the plain graph instead, and say so
            if not any(d.startswith("transformer fusions") for d in done):
                raise
            fusion_failed = cap.first_lines(exc, 1)
            log.warning("to_onnx: ONNX Runtime refuses the fused graph (%s); exporting without fusions", exc)
            program = _torch_export(wrapper, example, layout, opts)  # the fusions rewrote the program's graph
            proto, done = _proto(onnx, program, opts, device, False, meta)
            oe._save(onnx, proto, tmp, tmp_data, external)
            del proto
            done += oe._post_process(onnx, tmp, tmp_data, external, opts, device, meta, resave_metadata=False)
        clock.lap(
            f"{opts.quantize + ' quantization + ' if opts.quantize else ''}ONNX Runtime load and offline optimisation"
        )
        external = tmp_data.exists()
        parity, generation_check = [], {}
        if opts.verify:
            parity, generation_check = verify(tmp, device, module, wrapper, layout, input_ids, opts, meta)
            clock.lap("verification (logits, greedy tokens)")
        if external:
            oe._relocate_external(onnx, tmp, final_data.name)
        st.commit()
    final = onnx.load(str(path), load_external_data=False)
    report = oe._report(
        onnx,
        path,
        final_data,
        external,
        opts,
        device,
        done,
        parity,
        LOGITS_TOLERANCE[opts.quantize or opts.dtype],
        final,
        folded_first,
        t_start,
        final_proto=final,
    )
    clock.lap("report")
    report.generation = generation_check
    report.phases = clock.laps
    if opts.quantize:
        report.notes = [n for n in report.notes if "gross errors" not in n]
        cosine = min((p["min_cosine"] for p in parity), default=float("nan"))
        report.notes.append(
            f"{opts.quantize}: checked only against a broken model (each output's cosine to PyTorch ≥ "
            f"{QUANTIZED_MIN_COSINE}; here {cosine:.3f}); the drift is the parity above — judge it by task accuracy"
        )
    if fusion_failed:
        report.notes.append(f"decoder fusions refused by ONNX Runtime ({fusion_failed}); plain graph exported")
    elif not report.fused_ops.get("MultiHeadAttention") and not report.fused_ops.get("GroupQueryAttention"):
        report.notes.append("attention not fused for this architecture: it runs as MatMul/Softmax ops")
    if fast is not None:
        report.notes += fast.describe()
    else:
        report.notes.append("attention: the model's own code on every layer (attention='model')")
    report.notes.append(
        "logits at the last position only ([batch, 1, vocab]; logits='all' for every position)"
        if wrapper.last_logits
        else "logits at every position"
    )
    return report


class _Clock:
    """Seconds per phase of an export, for the report (where the minutes go)."""

    def __init__(self, start: float):
        self.last = start
        self.laps: dict[str, float] = {}

    def lap(self, name: str):
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now


def _proto(onnx, program, opts: ExportConfig, device: str, fuse: bool, meta: dict):
    """The program as an ONNX protobuf with its fusions, precision and metadata. Returns (proto, what was done)."""
    proto, done = oe._optimized_proto(program, opts, device, fuse=fuse, kv_io=opts.dtype == "fp16")
    done.insert(0, "cache as inputs/outputs (past_key_values.* → present.*)")
    if not opts.quantize and oe.share_transposed_constants(onnx, proto):  # (quantizers need the head's MatMul)
        done.append("head tied to the embedding kept as one constant (FusedMatMul transB)")
    dropped = drop_unused_norm_statistics(proto)
    if dropped:
        done.append(f"unused mean / inverse std-dev outputs of {dropped} normalisations left uncomputed")
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return proto, done


#: normalisation ops whose outputs 1 and 2 (mean, inverse standard deviation) are optional
NORM_OPS = (
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "LayerNormalization",
)


def drop_unused_norm_statistics(proto) -> int:
    """onnxscript's RMSNorm fusions name the mean / inverse std-dev outputs of the fused ops though nothing reads
    them; ONNX Runtime then computes and writes them at every call (measured: SkipSimplifiedLayerNormalization
    3.7 ms per int4 decode step against 2.3 ms in the builder's file, which leaves them empty). Unnamed, they
    are not computed. Returns how many nodes changed."""
    read = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    changed = 0
    for node in proto.graph.node:
        if node.op_type not in NORM_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        hit = False
        for k in (1, 2):
            if k < len(node.output) and node.output[k] and node.output[k] not in read:
                node.output[k] = ""
                hit = True
        changed += hit
    return changed


def _torch_export(wrapper: WithPast, example: tuple, layout: CacheLayout, opts: ExportConfig):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                wrapper,
                example,
                None,
                dynamo=True,
                optimize=opts.optimize != "none",
                # int4 stores int4 tensors (the embedding table's), which need opset 21
                opset_version=opts.opset or (21 if opts.quantize == "int4" else None),
                dynamic_shapes=_dynamic_shapes(layout),
                custom_translation_table=gqa.translations() if wrapper.plan is not None else None,
                input_names=layout.input_names(),
                output_names=layout.output_names(),
                verbose=False,
            )
        except Exception as exc:
            raise oe.ExportError(
                f"torch.onnx could not export {type(wrapper.model).__name__} with a cache:\n    "
                f"{cap.first_lines(_root_cause(exc))}{oe._untranslatable_ops(exc)}\nExport with task=None (no "
                f"cache) if the model's cached path cannot be traced."
            ) from exc


def _root_cause(exc: BaseException) -> BaseException:
    """torch.onnx wraps torch.export's error in its own: the innermost one names the problem."""
    seen = set()
    while (exc.__cause__ is not None) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _generation_metadata(model: nn.Module, layout: CacheLayout) -> dict[str, str]:
    """What the runner needs without the model's config: stop and padding tokens, the cache layout."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(gen, "pad_token_id", None)
    vocab = vocab_size(model)
    return {  # the model's own ids, in the vocabulary or not: the runner never feeds one outside it
        META_PREFIX + "eos_token_id": ",".join(str(int(e)) for e in eos),
        META_PREFIX + "pad_token_id": "" if pad is None else str(int(pad)),
        META_PREFIX + "vocab_size": "" if vocab is None else str(vocab),
        META_PREFIX + "layers": str(layout.layers),
    }


def vocab_size(model: nn.Module) -> int | None:
    """The rows of the model's input embedding table (its config's vocab_size without one); None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if isinstance(table, nn.Embedding):
        return table.num_embeddings
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def in_vocabulary(ids: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Where `ids` name a row of the embedding table (everywhere when the vocabulary is unknown)."""
    return (ids >= 0) & (ids < vocab) if vocab is not None else torch.ones_like(ids, dtype=torch.bool)


def _prompts(input_ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths from the example's first row, left-padded into one batch."""
    row = input_ids[0]
    n = max(int(row.numel()), 4)
    row = row.repeat(-(-n // row.numel()))[:n]
    short = max(1, n // 2)
    ids = torch.full((2, n), pad, dtype=torch.long)
    mask = torch.zeros((2, n), dtype=torch.long)
    ids[0], mask[0] = row, 1
    ids[1, n - short :], mask[1, n - short :] = row[-short:], 1
    return ids, mask


def verify(
    tmp: Path,
    device: str,
    module,
    wrapper: WithPast,
    layout: CacheLayout,
    input_ids,
    opts: ExportConfig,
    meta: dict | None = None,
):
    """Logits of a prefill (past 0) and of a decode step (past > 0) against PyTorch, then greedy generation
    through ONNX Runtime against the model's own `generate`; the file's metadata holds `meta`. Returns (parity
    rows, generation summary)."""
    precision = opts.quantize or opts.dtype
    tol = LOGITS_TOLERANCE[precision]
    sess = runtime.session(tmp, device)
    recorded = sess.get_modelmeta().custom_metadata_map
    lost = sorted(k for k, v in (meta or {}).items() if recorded.get(k) != v)
    if lost:
        raise oe.ExportError(
            f"the exported file lacks its metadata {lost} after ONNX Runtime's offline optimisation (the runner "
            f"reads stop/pad ids and options from it); export with optimize='exporter' to skip that step. Nothing "
            f"was written."
        )
    model_device = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    pad = _pad_id(wrapper.model)
    ids, mask = _prompts(input_ids.cpu(), pad)
    parity = []
    # prefill: the whole left-padded prompt, empty cache; then one decode step on the torch cache
    where = _reference_positions(wrapper)
    args = [ids, mask] + ([where(mask, ids.shape[1])] if layout.position_ids else [])
    past = layout.empty_past(2, 0)
    with torch.no_grad(), wrapper.reference():
        ref = wrapper(*(t.to(model_device) for t in args), *(p.to(model_device) for p in past))
    nxt = ref[0][:, -1:].argmax(-1).cpu()
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    args2 = [nxt, mask2] + ([where(mask2, 1)] if layout.position_ids else [])
    with torch.no_grad(), wrapper.reference():
        ref2 = wrapper(*(t.to(model_device) for t in args2), *ref[1:])
    names = layout.input_names()
    steps = ((args, past, ref, mask), (args2, list(ref[1:]), ref2, mask2))
    for step, (a, p, r, total) in enumerate(steps):
        feed = {n: v.detach().cpu().numpy() for n, v in zip(names, list(a) + list(p))}
        for n, i in zip(names, sess.get_inputs()):
            if "float16" in i.type:
                feed[n] = feed[n].astype("float16")
        got = sess.run(None, feed)
        # padded positions carry no meaning (their attention rows are empty): only real tokens are compared
        query = total[:, -a[0].shape[1] :].bool()
        expected, actual = _real(r, query, total), _real([torch.from_numpy(g) for g in got], query, total)
        result = compare(expected, actual)
        result.pop("ok")
        result["min_cosine"] = min(_cosine(e, a) for e, a in zip(expected, actual))
        result["shapes"] = [tuple(v.shape) for v in feed.values()][: len(a)] + [f"past {p[0].shape[2]}"]
        result["step"] = "prefill" if step == 0 else "decode"
        parity.append(result)
        # quantized: the numbers change by design, so only a broken model fails — outputs no longer pointing
        # the way PyTorch's do (cosine); float precisions: within the tolerance of each output's scale
        quantized = precision in ("int8", "int4")
        if (quantized and not result["min_cosine"] >= QUANTIZED_MIN_COSINE) or (
            not quantized and not result["max_rel"] <= tol
        ):
            raise oe.ExportError(
                f"ONNX Runtime ({device}) and PyTorch disagree on the {result['step']} logits/cache ({precision}): "
                f"max relative difference {result['max_rel']:.3g}"
                + (
                    f", cosine {result['min_cosine']:.3f} < {QUANTIZED_MIN_COSINE}"
                    if quantized
                    else f" > tolerance {tol:g}"
                )
                + ". Nothing was written."
            )
    summary = _verify_generation(sess, device, module, wrapper, ids, mask, pad, precision)
    return parity, summary


def _reference_positions(wrapper: WithPast):
    """The position ids the logits/cache parity feeds both sides: the runner's (real tokens counted), or each
    token's column where GroupQueryAttention rotates q/k itself (gqa.py, "Positions") — then the reference's
    cached keys are the file's, and its cache can be fed to the file's decode step."""
    if wrapper.plan is not None and any(la.fast and la.rotary_in_op for la in wrapper.plan.layers):
        return lambda mask, length: torch.arange(mask.shape[1] - length, mask.shape[1]).expand(mask.shape[0], -1)
    return positions


def _real(outputs, query: torch.Tensor, total: torch.Tensor) -> list[torch.Tensor]:
    """Logits at the real query positions, cache entries at the real positions: [tokens, …] each."""
    logits, *cache = (t.float().cpu() for t in outputs)
    # logits of the last position only (logits="last"): real in every left-padded row
    logits = logits[query] if logits.shape[1] == query.shape[1] else logits[:, -1]
    return [logits] + [c.transpose(1, 2)[total.bool()] for c in cache]


def _cosine(e: torch.Tensor, a: torch.Tensor) -> float:
    e, a = e.double().flatten(), a.double().flatten()
    norms = float(e.norm() * a.norm())
    return float(e @ a) / norms if norms else float(torch.equal(e, a))


def _pad_id(model) -> int:
    """The id the verification pads prompts with: the model's pad (else EOS) id when it lies in the vocabulary,
    else 0 — padded positions are masked, so any row of the table serves, and one outside it cannot be looked up."""
    gen = getattr(model, "generation_config", None)
    vocab = vocab_size(model)
    for value in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and (vocab is None or 0 <= value < vocab):
            return value
    return 0


def _verify_generation(sess, device, module, wrapper, ids, mask, pad, precision) -> dict:
    """Greedy tokens through ONNX Runtime vs the model's own generate (no EOS stop on either side: every
    position is compared). fp32 must match except after a step whose top-2 logits tie; other precisions report
    their agreement."""
    from neat_fx.generate import _quiet_generation

    n = VERIFY_NEW_TOKENS
    model = wrapper.adapted()
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen_kwargs = dict(
        input_ids=ids.to(model_device),
        attention_mask=mask.to(model_device),
        max_new_tokens=n,
        eos_token_id=None,  # no stop: every position is compared
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad(), _quiet_generation():
        out = model.generate(**gen_kwargs)
    ref = out.sequences[:, ids.shape[1] :].cpu()
    logits = torch.stack([s.float().cpu() for s in out.logits], 1)  # [batch, new, vocab]
    got = generation.generate(sess, ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=pad)
    got = torch.as_tensor(got[:, ids.shape[1] :])
    same = got == ref
    agreement = float(same.float().mean())
    summary = {"new_tokens": n, "prompts": [int(m.sum()) for m in mask], "token_agreement": agreement}
    if precision != "fp32" or bool(same.all()):
        return summary
    # fp32: each row may only diverge at a tie (numerical noise picks either of two equal logits)
    for row in range(ids.shape[0]):
        wrong = (~same[row]).nonzero()
        if not len(wrong):
            continue
        t = int(wrong[0])
        top = logits[row, t].topk(2).values
        scale = float(logits[row, t].abs().max()) or 1.0
        if float(top[0] - top[1]) > TIE_MARGIN * scale:
            raise oe.ExportError(
                f"greedy generation through ONNX Runtime ({device}) differs from PyTorch's in prompt {row} at new "
                f"token {t} (ONNX {int(got[row, t])}, PyTorch {int(ref[row, t])}; PyTorch's top-2 logits "
                f"{float(top[0]):.4g} vs {float(top[1]):.4g} are no tie). Nothing was written."
            )
        summary.setdefault("ties", []).append({"prompt": row, "token": t})
    return summary
