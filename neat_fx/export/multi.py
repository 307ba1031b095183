"""Multi-adapter ONNX: `to_onnx(base_model, example_inputs, path, adapters={"a": dir_a, "b": dir_b})`.

One base graph for any number of saved adapters, switched by ONNX Runtime's LoRA mechanism (an adapter file's
tensors override graph inputs of the same names). `neat_fx.serve` builds the bank first, so every adapter is
checked against the base (fingerprints, shapes) before anything is exported. Then each bank becomes one
adapter's update read from two graph inputs,

    neat.<site>.h   (d_in, r)    H = σ(W0ᵀ A), computed in float32 from W0
    neat.<site>.sb  (d_out, r)   s·B

(r: the largest rank any adapter has at that site; smaller ones are padded with zero columns, which add
nothing), computing y + (x H)(s·B)ᵀ, and every parameter some adapter trained in full (a classifier head) is
read from the input `neat.<parameter name>`. Each of these inputs also has an initializer — zeros for H and
s·B, the base value for a trained parameter — so the file run without an adapter IS the base model. Neither
the exporter's optimiser nor ONNX Runtime constant-folds an initializer that is a graph input, so the
optimised file keeps them overridable (checked after optimisation, and by the verification).

`<model stem>.<name>.onnx_adapter` (onnxruntime.AdapterFormat) beside the model holds one adapter's values: the
sites and parameters it has (the others keep their defaults). Named after the model too, so that two models exported
into one folder with adapters of the same names keep their own files. The model records its fingerprint (the base
weights its adapters were computed from, the inputs they override) and each file the tag of that fingerprint and its
adapter's name (`runtime.adapter_tag`): `AdapterSession` refuses a file another export wrote, and the export refuses
to replace an existing file that is not the replaced model's own. Verified before anything is renamed into place: ONNX
Runtime with each adapter active (LoraAdapter + RunOptions.add_active_adapter) against the bank with that
adapter active, and the bare model against the base model, on the example and on a batch of another shape.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from neat_fx import capture as cap
from neat_fx.atomic import Staging
from neat_fx.containers import GraphContainer
from neat_fx.errors import ConfigError
from neat_fx.io import fingerprint
from neat_fx.names import module_name
from neat_fx.numerics import compare, flat_tensors

from . import onnx_export as oe
from . import runtime
from .config import ExportConfig

log = logging.getLogger("neat_fx.export")

ADAPTER_SUFFIX = ".onnx_adapter"
#: children of the export container holding the inputs' default values (their buffers become the initializers)
SITES = "neat_adapter_inputs"
TRAINED = "neat_trained_inputs"

_aten = torch.ops.aten


@dataclass
class AdapterInput:
    """One overridable graph input: its name, the buffer it is exported from, its default, and each adapter's
    value (only the adapters that have it)."""

    name: str
    buffer: str
    default: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)


class SiteInput(nn.Module):
    """One site's update read from one adapter's 2-D `h` (d_in, r) and `sb` (d_out, r): `y + (x h) sbᵀ` in the
    op's form. Used only for the forms the export graph does not spell out as aten ops (left, einsum)."""

    def __init__(self, h: torch.Tensor, sb: torch.Tensor):
        super().__init__()
        self.register_buffer("h", h)
        self.register_buffer("sb", sb)

    def forward(self, x: torch.Tensor, y: torch.Tensor, form: str = "right") -> torch.Tensor:
        h, sb = self.h, self.sb
        x = x.to(h.dtype)
        if form == "right":
            return y + torch.nn.functional.linear(x @ h, sb).to(y.dtype)
        if form == "left":
            return y + (sb @ (h.t() @ x)).to(y.dtype)
        eq_h, eq_b = form[len("einsum:") :].split(";")
        return y + torch.einsum(eq_b, torch.einsum(eq_h, x, h), sb).to(y.dtype)


def input_form(bank) -> tuple[GraphContainer, list[AdapterInput]]:
    """The bank's graph with one adapter's worth of state: each SiteBank call becomes `y + (x h) sbᵀ` on the 2-D
    buffers `neat_adapter_inputs.<key>.{h,sb}` (zeros), each stacked trained parameter the buffer
    `neat_trained_inputs.<key>` (the base value). Returns the container and the inputs to declare."""
    from neat_fx.serving import BANK

    graph = copy.deepcopy(bank.graph("eval"))
    out = GraphContainer()
    for name, child in bank._modules.items():
        if name not in ("banks", "trained"):
            out.add_module(name, child)
    sites, trained = nn.Module(), nn.Module()
    out.add_module(SITES, sites)
    out.add_module(TRAINED, trained)
    fake = _fake_mode(graph)
    inputs: list[AdapterInput] = []

    def constant(target: str, value: torch.Tensor) -> fx.Node:
        node = graph.get_attr(target)
        if fake is not None:
            node.meta["val"] = fake.from_tensor(value)
        return node

    for node in list(graph.nodes):
        key = node.meta.get(BANK)
        if not key or node.op != "call_module":
            continue
        if key not in sites._modules:
            stacked = bank.banks[key]
            site, have = bank.site_sources[key]
            slot = SiteInput(torch.zeros_like(stacked.h[0]), torch.zeros_like(stacked.sb[0]))
            sites.add_module(key, slot)
            for part, stack in (("h", stacked.h), ("sb", stacked.sb)):
                inputs.append(
                    AdapterInput(
                        f"neat.{module_name(site)}.{part}",
                        f"{SITES}.{key}.{part}",
                        getattr(slot, part),
                        {a: stack[bank.index_of(a)] for a in have},
                    )
                )
        x, y = node.args[0], node.args[1]
        form = node.args[3] if len(node.args) > 3 else "right"
        with graph.inserting_before(node):
            new = _site_nodes(graph, constant, sites._modules[key], f"{SITES}.{key}", x, y, form, fake)
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    for node in list(graph.nodes):  # select(index_select(get_attr trained.<key>, 0, active_index), 0, 0)
        if not (node.op == "call_function" and node.target is _aten.select.int):
            continue
        picked = node.args[0]
        if not (isinstance(picked, fx.Node) and picked.target is _aten.index_select.default):
            continue
        stack = picked.args[0]
        if not (stack.op == "get_attr" and stack.target.startswith("trained.")):
            continue
        key = stack.target[len("trained.") :]
        name, have = bank.trained_sources[key]
        if not hasattr(trained, key):
            base = bank.model.get_parameter(name).detach().clone()
            trained.register_buffer(key, base)
            values = getattr(bank.trained, key)
            inputs.append(
                AdapterInput(f"neat.{name}", f"{TRAINED}.{key}", base, {a: values[bank.index_of(a)] for a in have})
            )
        with graph.inserting_before(node):
            new = constant(f"{TRAINED}.{key}", getattr(trained, key))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for dead in (picked, stack):
            if not dead.users:
                graph.erase_node(dead)
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target == "active_index" and not node.users:
            graph.erase_node(node)
    graph.lint()
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two adapter inputs would share a name: {sorted(n for n in names if names.count(n) > 1)}")
    out._set_graph("eval", graph)
    out._set_reference(bank._reference_name)
    out.eval()
    return out, inputs


def _fake_mode(graph: fx.Graph):
    from torch._guards import detect_fake_mode

    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return detect_fake_mode([val])
    return None


def _site_nodes(graph: fx.Graph, constant, slot: SiteInput, target: str, x, y, form: str, fake) -> fx.Node:
    """`y + (x h) sbᵀ` as aten ops with shapes recorded (so the export passes — pruning unread positions — see
    through them) for the right form; the SiteInput module for the others."""
    xv, yv = x.meta.get("val"), y.meta.get("val")
    if form != "right" or not isinstance(xv, torch.Tensor) or not isinstance(yv, torch.Tensor):
        new = graph.call_module(target, (x, y) + ((form,) if form != "right" else ()))
        if isinstance(yv, torch.Tensor):
            new.meta["val"] = yv
        return new

    def record(node, fn):
        if fake is not None:
            with contextlib.suppress(Exception), fake:
                node.meta["val"] = fn()
        return node

    h = constant(target + ".h", slot.h)
    sb = constant(target + ".sb", slot.sb)
    if xv.dtype != slot.h.dtype:
        x = record(
            graph.call_function(_aten._to_copy.default, (x,), {"dtype": slot.h.dtype}), lambda: xv.to(slot.h.dtype)
        )
    xh = record(graph.call_function(_aten.matmul.default, (x, h)), lambda: torch.matmul(x.meta["val"], h.meta["val"]))
    d = record(
        graph.call_function(_aten.linear.default, (xh, sb)),
        lambda: torch.nn.functional.linear(xh.meta["val"], sb.meta["val"]),
    )
    if yv.dtype != slot.h.dtype:
        d = record(
            graph.call_function(_aten._to_copy.default, (d,), {"dtype": yv.dtype}), lambda: d.meta["val"].to(yv.dtype)
        )
    return record(graph.call_function(_aten.add.Tensor, (y, d)), lambda: yv + d.meta["val"])


def _promote(program, inputs: list[AdapterInput]) -> list[AdapterInput]:
    """Rename the inputs' initializers and make them plain graph inputs *without* an initializer for now: the
    exporter's optimiser must not see their values (onnxscript drops a Gemm's all-zero bias even when it is a
    graph input). `_attach_defaults` gives them back in the serialised model. Inputs whose buffer the exporter left
    out (nothing reads them) are dropped; returns the kept ones."""
    g = program.model.graph
    kept = []
    for inp in inputs:
        value = g.initializers.get(inp.buffer)
        if value is None:
            log.info("to_onnx: %s is not read by the exported graph; no input made for it", inp.name)
            continue
        g.initializers.pop(inp.buffer)
        value.name = inp.name
        value.const_value = None
        g.inputs.append(value)
        kept.append(inp)
    return kept


def _attach_defaults(proto, inputs: list[AdapterInput]):
    """Each adapter input's initializer (its default) added to the serialised model, after every graph rewrite
    of ours ran (the exporter's optimiser, transformer fusions)."""
    from onnx import numpy_helper

    declared = {i.name for i in proto.graph.input}
    for inp in inputs:
        if inp.name not in declared:
            raise oe.ExportError(f"the exporter's optimiser removed the adapter input {inp.name}; nothing was written")
        proto.graph.initializer.append(
            numpy_helper.from_array(inp.default.detach().cpu().contiguous().numpy(), inp.name)
        )


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence the loggers `names` below ERROR (onnx_ir warns once per initializer that is a graph input)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_declared(onnx, model_path: Path, inputs: list[AdapterInput]):
    """The (optimised) file still declares every adapter input as a graph input with its initializer."""
    proto = onnx.load(str(model_path), load_external_data=False)
    declared = {i.name for i in proto.graph.input}
    initialized = {t.name for t in proto.graph.initializer}
    lost = [i.name for i in inputs if i.name not in declared or i.name not in initialized]
    if lost:
        raise oe.ExportError(
            f"after optimisation {len(lost)} adapter inputs are no longer overridable inputs with defaults "
            f"(e.g. {lost[0]}); nothing was written"
        )


def _write_adapter(path: Path, inputs: list[AdapterInput], name: str, model_fingerprint: str):
    import numpy as np

    ort = runtime._ort()
    arrays = {
        i.name: np.ascontiguousarray(i.values[name].detach().cpu().float().numpy()) for i in inputs if name in i.values
    }
    tag = runtime.adapter_tag(model_fingerprint, name)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(tag)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    fmt.export_adapter(str(path))
    back = ort.AdapterFormat.read_adapter(str(path))
    if set(back.get_parameters()) != set(arrays) or back.get_model_version() != tag:
        raise oe.ExportError(f"the adapter file for {name!r} did not read back what was written; nothing was written")


def _adapter_files(path: Path, names: list[str]) -> dict[str, Path]:
    """`<model stem>.<adapter name>.onnx_adapter` beside the model for each adapter."""
    files = {}
    for name in names:
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(
                f"adapter name {name!r} cannot name a file; pass a dict {{name: folder}} with another name"
            )
        files[name] = path.with_name(f"{path.stem}.{name}{ADAPTER_SUFFIX}")
        if files[name] == path:
            raise ConfigError(f"the adapter file of {name!r} would overwrite the model at {path}")
    return files


def _model_fingerprint(bank, inputs: list[AdapterInput]) -> str:
    """What the adapter files are valid for: the base weights their H = σ(W0ᵀ A) were computed from (our
    fingerprints of them) and the inputs they override (names, shapes). A hex digest."""
    base = {name: fingerprint(bank.model.get_parameter(name)) for name, _ in bank.site_sources.values()}
    shapes = {i.name: list(i.default.shape) for i in inputs}
    text = json.dumps({"base": base, "inputs": shapes}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_replaceable(path: Path, files: dict[str, Path], model_fingerprint: str):
    """An existing adapter file is replaced only if it is the replaced model's own (or already this export's):
    another model's file of the same name (`a.onnx` with adapter 'b.c', `a.b.onnx` with adapter 'c') is left
    alone and the export refused."""
    existing = {n: f for n, f in files.items() if f.exists()}
    if not existing:
        return
    previous = _recorded_fingerprint(path)
    for name, f in existing.items():
        mine = {runtime.adapter_tag(model_fingerprint, name)}
        if previous is not None:
            mine.add(runtime.adapter_tag(previous, name))
        if runtime.recorded_tag(f) not in mine:
            raise ConfigError(
                f"{f} exists and is not the adapter file of {name!r} of the model at {path}: it may belong to another "
                f"model. Remove it, or choose another model path or adapter name; nothing was written"
            )


def _recorded_fingerprint(path: Path) -> str | None:
    """The model fingerprint the multi-adapter model at `path` records, or None (no file, or not one of ours)."""
    try:
        return runtime.recorded_options(path).get(runtime.META_MODEL_FINGERPRINT) if path.is_file() else None
    except Exception:  # not an ONNX model: nothing of it to keep
        return None


def export(model: nn.Module, example_inputs, path: Path, opts: ExportConfig, device: str, t_start: float):
    """to_onnx(..., adapters=...): see the module's docstring."""
    import onnx

    from neat_fx.serving import _named_folders, serve

    if isinstance(model, GraphContainer):
        raise ConfigError(
            f"to_onnx(..., adapters=...) exports the untouched base model with saved adapter folders; got a "
            f"{type(model).__name__}. Pass the model the adapters were trained on (save the NeatModule's adapters "
            f"with neat_fx.save_adapters first)"
        )
    named = _named_folders(opts.adapters)
    files = _adapter_files(path, list(named))
    args, kwargs = cap.split_example_inputs(example_inputs)
    with cap.train_mode(model, False):
        bank = serve(model, named, example_inputs)  # every adapter checked against the base: nothing written yet
        container, inputs = input_form(bank)
        model_fingerprint = _model_fingerprint(bank, inputs)
        _check_replaceable(path, files, model_fingerprint)
        program, _, optimizations, _ = oe._torch_export(container, args, kwargs, opts, optimize_program=False)
        oe._name_axes(program)
        second = (
            oe._probe_second_batch(program, bank, args, kwargs) if opts.verify and opts.verify_inputs is None else None
        )
        inputs = _promote(program, inputs)
        if opts.optimize != "none":
            with _quiet("onnx_ir", "onnxscript"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program.optimize()
        proto, fusions = oe._optimized_proto(program, opts, device)
        _attach_defaults(proto, inputs)
        optimizations += fusions
        meta = oe._metadata(opts)
        meta[runtime.META_ADAPTERS] = json.dumps({n: f.name for n, f in files.items()})
        meta[runtime.META_ADAPTER_INPUTS] = json.dumps([i.name for i in inputs])
        meta[runtime.META_MODEL_FINGERPRINT] = model_fingerprint
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        external = oe._proto_bytes(proto) > oe.EXTERNAL_DATA_ABOVE
        tol = oe.TOLERANCE[opts.dtype] * (10 if opts.approximate else 1)
        final_data = path.with_name(path.name + ".data")
        with Staging() as st:
            tmp_adapters = {n: st.path(f, ADAPTER_SUFFIX) for n, f in files.items()}  # renamed before the model
            tmp = st.path(path, ".onnx")
            tmp_data = tmp.with_name(tmp.name + ".data")
            if external:
                st.add(tmp_data, final_data)
            oe._save(onnx, proto, tmp, tmp_data, external)
            if opts.optimize in ("auto", "fusions") and not external:
                oe._ort_offline(tmp, device, list(oe._disabled_optimizers(opts)[device]), quiet=True)
                optimizations.append(f"ONNX Runtime graph optimisations saved offline ({device}, level EXTENDED)")
                oe._save(onnx, oe._with_metadata(onnx, tmp, meta), tmp, tmp_data, external)
            _check_declared(onnx, tmp, inputs)
            for n, f in tmp_adapters.items():
                _write_adapter(f, inputs, n, model_fingerprint)
            parity = []
            if opts.verify:
                parity = _verify(tmp, tmp_adapters, device, model, bank, args, kwargs, opts.verify_inputs, second, tol)
            if external:
                oe._relocate_external(onnx, tmp, final_data.name)
            st.commit()
    report = oe._report(
        onnx, path, final_data, external, opts, device, optimizations, parity, tol, proto, False, t_start
    )
    adapter_names = {i.name for i in inputs}
    report.input_names = [n for n in report.input_names if n not in adapter_names]
    report.adapters = dict(files)
    report.adapter_inputs = [i.name for i in inputs]
    report.seconds = time.perf_counter() - t_start
    return report


def _verify(tmp, tmp_adapters, device, model, bank, args, kwargs, verify_inputs, second, tol) -> list[dict]:
    """ONNX Runtime on the temporary files: bare against the base model, with each adapter active against the
    bank with that adapter active; on the example and the other batch. Raises ExportError on a mismatch."""
    ort = runtime._ort()
    sess = runtime.session(tmp, device)
    onnx_inputs = [i.name for i in sess.get_inputs()]
    batches = [(args, kwargs)]
    extra = [cap.split_example_inputs(v) for v in verify_inputs] if verify_inputs is not None else [second]
    batches += [e for e in extra if e is not None]
    if len(batches) == 1:
        log.warning("to_onnx: no second input shape the model accepts was found; verified on the example only")
    run_options, keep = {None: ort.RunOptions()}, []
    for name, f in tmp_adapters.items():
        adapter = ort.LoraAdapter()
        adapter.Load(str(f))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        keep.append(adapter)
        run_options[name] = ro
    parity = []
    for a, k in batches:
        feed = oe._feed(onnx_inputs, a, k)
        shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
        for name, ro in run_options.items():
            who = f"adapter {name!r} active" if name else "no adapter (the base model)"
            with torch.no_grad():
                if name is None:
                    ref = model(*a, **k)
                else:  # the adapter given to this call only: the bank's active adapter is not touched
                    ref = bank._run_as(bank.index_of(name), None, a, k)
            try:
                got = sess.run(None, feed, ro)
            except Exception as exc:
                raise oe.ExportError(
                    f"ONNX Runtime ({device}) with {who} fails on inputs of shapes {shapes}, which PyTorch "
                    f"accepts:\n    {cap.first_lines(exc, 2)}\nNothing was written."
                ) from exc
            result = compare(flat_tensors(ref), list(got))
            result.pop("ok")
            result.update(shapes=shapes, adapter=name)
            parity.append(result)
            if not result["max_rel"] <= tol:
                raise oe.ExportError(
                    f"ONNX Runtime ({device}) with {who} and PyTorch disagree on inputs of shapes {shapes}: max "
                    f"abs difference {result['max_abs']:.3g}, max relative {result['max_rel']:.3g} > tolerance "
                    f"{tol:g}{' (' + result['note'] + ')' if 'note' in result else ''}. Nothing was written."
                )
    return parity
