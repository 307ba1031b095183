"""ONNX Runtime sessions for exported models: the right providers, and the session options the export
recorded in the model's metadata (`neat_fx.ort.*`)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

META_DISABLED = "neat_fx.ort.disabled_optimizers"
# A multi-adapter export (to_onnx(..., adapters=...)) records its adapters, {name: file beside the model}, and
# the graph inputs they override (JSON).
META_ADAPTERS = "neat_fx.adapters"
META_ADAPTER_INPUTS = "neat_fx.adapter_inputs"
# ... and the fingerprint of what its adapter files are valid for (the base weights, the inputs they override);
# each file carries `adapter_tag(fingerprint, its name)` as its AdapterFormat model version (an int32 is all the
# format holds beside the tensors), so a file written for another model, or for another adapter, is refused.
META_MODEL_FINGERPRINT = "neat_fx.model_fingerprint"


def adapter_tag(model_fingerprint: str, adapter: str) -> int:
    """The model version an adapter file of the model with `model_fingerprint` records for `adapter`: 31 bits of
    a hash of both, never 0 (what a file written without one reads)."""
    digest = hashlib.sha256(f"{model_fingerprint}\0{adapter}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1) + 1


def recorded_tag(path) -> int | None:
    """The model version the adapter file at `path` records, or None if it is not an ONNX Runtime adapter file."""
    try:
        return int(_ort().AdapterFormat.read_adapter(str(path)).get_model_version())
    except RuntimeError:
        return None


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "onnxruntime is not installed: pip install 'neat-fx[onnx]' (CPU) or 'neat-fx[gpu]' (CUDA)"
        ) from None
    return onnxruntime


def resolve_device(device: str, tf32: bool = False) -> tuple[str, list]:
    """(device, providers) for "cpu", "cuda" or "auto". On CUDA, TF32 matrix products stay off unless asked
    (ONNX Runtime turns them on by default; they round fp32 products to 10 bits of mantissa, as PyTorch's
    default does not, so fp32 parity with PyTorch would fail)."""
    if not isinstance(tf32, bool):
        raise TypeError(f"tf32 must be True or False, got {tf32!r}")
    ort = _ort()
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            from neat_fx.errors import DeviceError

            raise DeviceError(
                f"device='cuda' needs ONNX Runtime's CUDAExecutionProvider, which this onnxruntime lacks "
                f"(providers: {available}). Install neat-fx[gpu] (onnxruntime-gpu) in an environment without "
                f"the CPU onnxruntime, or use device='cpu'."
            )
        return "cuda", [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}), "CPUExecutionProvider"]
    if device != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return "cpu", ["CPUExecutionProvider"]


def recorded_options(path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("neat_fx.")}


def session(path, device: str = "auto", *, threads: int | None = None, options=None, tf32: bool = False):
    """An `onnxruntime.InferenceSession` for `path` on `device` ("cpu", "cuda" or "auto"), with all graph
    optimisations on and the optimisers the export found slower disabled (recorded in the file).
    tf32: allow TF32 matrix products on CUDA (faster fp32, about 1e-3 relative error; off by default)."""
    ort = _ort()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    device, providers = resolve_device(device, tf32)
    so = options or ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    meta = recorded_options(path)
    if options is None and META_ADAPTERS in meta:
        # errors only: ONNX Runtime warns once per initializer that is also a graph input, which is what an
        # adapter input is by design
        so.log_severity_level = 3
    disabled = [s for s in meta.get(META_DISABLED + "." + device, "").split(",") if s]
    return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=disabled or None)


class BoundRunner:
    """Runs a session with inputs and outputs kept on the device (IOBinding): timing without host copies."""

    def __init__(self, sess, feed: dict[str, np.ndarray], device: str = "cuda", device_id: int = 0):
        ort = _ort()
        self.sess = sess
        self.binding = sess.io_binding()
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v, device, device_id) for k, v in feed.items()}
        for k, v in self._values.items():
            self.binding.bind_ortvalue_input(k, v)
        for o in sess.get_outputs():
            self.binding.bind_output(o.name, device, device_id)

    def __call__(self):
        self.sess.run_with_iobinding(self.binding)
        return self.binding


class AdapterSession:
    """A multi-adapter ONNX model (`to_onnx(base, example, path, adapters=...)`) in ONNX Runtime, with every
    adapter file it records loaded (`onnxruntime.LoraAdapter`) and a `RunOptions` per adapter:

        runner = AdapterSession("model.onnx")
        runner.run(None, feed, adapter="sst2")   # adapter=None: the base model
        sess, opts = runner.session, runner.run_options("sst2")   # or ONNX Runtime directly

    Switching adapters is passing another prepared RunOptions: nothing is reloaded or recompiled. The adapter
    files stay on the host (ONNX Runtime copies them to a CUDA device per run)."""

    def __init__(self, path, device: str = "auto", *, threads: int | None = None, options=None, tf32: bool = False):
        from neat_fx.errors import ConfigError

        ort = _ort()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        meta = recorded_options(path)
        if META_ADAPTERS not in meta:
            raise ConfigError(
                f"{path} records no adapters: it was not exported with to_onnx(..., adapters=...); "
                f"run it with neat_fx.export.session"
            )
        files = json.loads(meta[META_ADAPTERS])
        self.path = path
        self.adapter_inputs: list[str] = json.loads(meta.get(META_ADAPTER_INPUTS, "[]"))
        self.adapter_files = {name: path.parent / file for name, file in files.items()}
        missing = [f"{name!r} ({f})" for name, f in self.adapter_files.items() if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path.name} serves adapters whose files are missing: {', '.join(missing)}; to_onnx writes "
                f"them beside the model: copy them along with it"
            )
        _check_adapter_files(path, meta.get(META_MODEL_FINGERPRINT), self.adapter_files)
        self.session = session(path, device, threads=threads, options=options, tf32=tf32)
        self._adapters, self._options = {}, {None: ort.RunOptions()}
        for name, f in self.adapter_files.items():
            adapter = ort.LoraAdapter()
            adapter.Load(str(f))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            self._adapters[name] = adapter  # kept alive as long as its RunOptions
            self._options[name] = ro

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_files)

    def run_options(self, adapter: str | None = None):
        """The `onnxruntime.RunOptions` that make `adapter` active (None: the base model)."""
        try:
            return self._options[adapter]
        except (KeyError, TypeError):
            from neat_fx.errors import ConfigError

            raise ConfigError(
                f"no adapter named {adapter!r}; {self.path.name} serves {', '.join(map(repr, self.adapter_names))} "
                f"(or adapter=None for the base model)"
            ) from None

    def run(self, output_names, feed: dict, adapter: str | None = None) -> list:
        """`session.run(output_names, feed)` with `adapter` active (None: the base model)."""
        return self.session.run(output_names, feed, self.run_options(adapter))

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()


def _check_adapter_files(path: Path, fingerprint: str | None, files: dict[str, Path]):
    """Each adapter file records the tag of this model and its name: a file another export wrote (another base,
    another model's adapter of the same name) is refused, not run."""
    from neat_fx.errors import AdapterMismatchError

    if fingerprint is None:  # written before the files were tagged (and named after their model)
        names = ", ".join(f.name for f in files.values())
        warnings.warn(
            f"{path.name} was exported by an older neat_fx: its adapter files ({names}) are not named after it "
            f"and carry no fingerprint, so another model exported into the same folder with adapters of the same "
            f"names may have overwritten them unnoticed. Export it again with to_onnx(base_model, example, "
            f"{str(path)!r}, adapters=...) to have them checked",
            stacklevel=3,
        )
        return
    for name, f in files.items():
        want, got = adapter_tag(fingerprint, name), recorded_tag(f)
        if got == want:
            continue
        if got is None:
            what = "it is not an ONNX Runtime adapter file"
        elif got == 0:
            what = "it records no model tag (written by another tool or an older neat_fx)"
        else:
            what = f"it records model tag {got}, written for another model or another adapter"
        raise AdapterMismatchError(
            f"{f} is not the file of adapter {name!r} of {path} (which expects model tag {want}): {what}. It was "
            f"copied or overwritten from another export: copy the file to_onnx wrote beside {path.name}, or export "
            f"again with to_onnx(base_model, example, {str(path)!r}, adapters=...)"
        )
