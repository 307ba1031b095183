"""Hugging Face Trainer and TRL: a NEAT model where they expect a `PeftModel`. (docs/trainers.md)

    nm = neat_fx.transform(model, "all-linear", example_inputs=batch, rank=8)
    model = neat_fx.hf.wrap(nm)                        # what you hand the trainer
    SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok).train()
    DPOTrainer(model=model, ref_model=neat_fx.hf.reference_model(nm), ...)   # the base, no second copy

Why a wrapper and not `nm` itself: `nm` runs one graph captured for one call structure, and the trainers call the
model in many (TRL patches `model.forward` with a fused LM head that runs the backbone alone and reads the head's
weight; `use_cache=`, `logits_to_keep=`, `num_items_in_batch=` keywords; `generate` inside GRPO). `wrap(nm)` runs
the model's own Python code with nm's adapters in it (`neat_fx.eager`): the same function, the same parameters —
training the wrapper trains nm — and everything a trainer looks for: `config`, `generation_config`,
`name_or_path`, the model's forward signature (so `remove_unused_columns` keeps the right columns),
`get_input_embeddings`, `enable_input_require_grads`, gradient checkpointing, `generate`,
`save_pretrained` (our adapter format + a model card), `print_trainable_parameters`, `disable_adapter()`.

`NeatAdaptersCallback` (for `Trainer(model=nm)` with the captured graph) writes the adapters into every checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

try:
    from transformers import PreTrainedModel, TrainerCallback
except ImportError:
    raise ImportError(
        "neat_fx.hf integrates with the Hugging Face Trainer and needs transformers: pip install transformers"
    ) from None

from . import quantized
from .atomic import write_text_atomic
from .containers import NeatModule
from .distributed import any_sharded, copy_into
from .eager import adapters_active, adapters_disabled, base_view, eager_view
from .errors import ConfigError
from .generate import adapted_view, cached_adapted_weights
from .io import native as _native
from .io import save_adapters

ADAPTERS_SUBFOLDER = "neat_adapters"
#: beside our adapter files, so that `Trainer(resume_from_checkpoint=…)` finds the weights: it reads this index
#: (transformers' sharded-checkpoint name) and loads the file it names into the wrapper with `load_state_dict`.
TRAINER_INDEX = "model.safetensors.index.json"


class EagerNeatModel(PreTrainedModel):
    """`neat_fx.hf.wrap(nm)`: the Hugging Face model with nm's adapters in its own code. See the module docstring.

    Its state (`state_dict`, `save_pretrained`, what a Trainer checkpoint holds) is nm's trained state only — the
    adapters and the parameters trained in full, by the names of our format; the base is never saved."""

    base_model_prefix = ""
    supports_gradient_checkpointing = True
    # the wrapped model keeps the attention implementation it was built with; these only let __init__ accept it
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True
    _can_generate = False  # set per wrapped class (wrap)

    def __init__(self, nm: NeatModule):
        model = nm.model
        config = copy.deepcopy(model.config)
        attention = getattr(model.config, "_attn_implementation_internal", None)
        super().__init__(config)
        config._attn_implementation_internal = attention
        self.name_or_path = getattr(model, "name_or_path", config.name_or_path)
        if getattr(model, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(model.generation_config)
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        object.__setattr__(self, "_nm", nm)  # not a child: trainers' module walks (dropout off, .train()) stay off nm
        self.model = eager_view(nm, training=model.training)
        for module in self.model.modules():  # the trainer's writes (use_cache, …) go to the wrapper's copy
            if module.__dict__.get("config") is model.config:
                module.__dict__["config"] = config
        if getattr(self, "generation_config", None) is not None:
            self.model.__dict__["generation_config"] = self.generation_config
        self.adapters = nm.adapters  # shared: what the optimizer finds in parameters()
        self.trainable = nm.trainable
        self.warnings_issued = {}

    # -- what trainers read ---------------------------------------------------------------------------
    @property
    def neat_module(self) -> NeatModule:
        """The NeatModule this wraps (fold, export, save_adapters take it)."""
        return self._nm

    @classmethod
    def can_generate(cls) -> bool:
        return cls._can_generate

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's backbone (what TRL's fused LM head runs), with the adapters in it."""
        return self.model.base_model

    def get_base_model(self) -> nn.Module:
        """The wrapped model with the adapters in it (PEFT's name)."""
        return self.model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def enable_input_require_grads(self):
        if getattr(self.model, "_require_grads_hooks", None):  # once: each trainer (and checkpointing) asks again
            return
        self.model.enable_input_require_grads()

    def disable_input_require_grads(self):
        self.model.disable_input_require_grads()

    def resize_token_embeddings(self, *args, **kwargs):
        raise ConfigError(
            "the adapters were built for the model's vocabulary: resize the token embeddings of the model before "
            "neat_fx.transform, not after"
        )

    def tie_weights(self, *args, **kwargs):  # the wrapped model's ties are its own; nothing to tie here
        return None

    def forward(self, *args, **kwargs):  # signature: the wrapped model's (wrap)
        if torch.compiler.is_compiling():
            return self.model(*args, **kwargs)
        self._nm.follow_merges()
        if torch.is_grad_enabled() and any(s.quantization for s in self._nm.site_infos):
            with quantized.recompute_in_backward():  # one site's dequantized weight at a time (neat_fx.quantized)
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    # -- adapters on and off ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapters(self):
        """`with model.disable_adapters():` the base model, exactly (W0, the original of every parameter trained in
        full), for this thread: the reference of DPO / KTO / GRPO, or an evaluation against the base."""
        with adapters_disabled(self._nm):
            yield

    disable_adapter = disable_adapters  # PEFT's spelling, which TRL and users call

    # -- gradient checkpointing: the wrapped model's own (HF's per-layer checkpointing) -------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(self.model).__name__} does not support gradient checkpointing")
        model = self.model
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(activation_checkpointing_kwargs, **kwargs)
        # the base is frozen: with reentrant checkpointing no input of a layer would need a gradient, and the
        # adapters inside would get none (PEFT does the same)
        if hasattr(self.model, "get_input_embeddings"):
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    # -- generation: the model's own generate with W0 + ΔW folded (kept while the adapters do not change) ---
    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """The wrapped model's `generate` (its KV cache, every option), on W0 + ΔW as the adapters are now (the
        fold is kept until an optimizer step changes them: see neat_fx.generate); inside `disable_adapters()`,
        the base model's."""
        nm = self._nm
        weights = cached_adapted_weights(nm) if adapters_active(nm) else {}
        view = adapted_view(nm.model, weights, classes=quantized.view_classes(nm.model))
        view.__dict__["config"] = self.config
        if getattr(self, "generation_config", None) is not None:
            view.__dict__["generation_config"] = self.generation_config
        return view.generate(*args, **kwargs)

    def merge_and_unload(self) -> nn.Module:
        """PEFT's name for `neat_fx.merge_into(model, nm)`: W0 + ΔW written into the model's own weights (in place),
        which it returns; nm keeps its own W0 and goes on computing the same function."""
        from .fold import merge_into

        return merge_into(self._nm.model, self._nm)

    # -- counts ---------------------------------------------------------------------------------------
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return self._nm.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all), PEFT's contract."""
        return self._nm.parameter_counts()

    def print_trainable_parameters(self):
        trainable, total = self._nm.parameter_counts()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # -- state: nm's trained tensors, by our format's names ---------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = OrderedDict() if destination is None else destination
        for name, tensor in _native.tensors_of(self._nm).items():
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Copy our format's tensors (what `state_dict` and a Trainer checkpoint hold) into nm; shapes checked."""
        own = _native.tensors_of(self._nm)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        wrong = [
            f"{k}: {tuple(state_dict[k].shape)} for {tuple(own[k].shape)}"
            for k in own
            if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
        ]
        if wrong or (strict and (missing or unexpected)):
            raise ConfigError(
                f"the state does not fit these adapters: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), wrong shapes {wrong[:3]}; load a "
                f"checkpoint written by this wrap(nm) (same patterns and rank)"
            )
        with torch.no_grad():
            for k, tensor in own.items():
                if k in state_dict:
                    copy_into(tensor, state_dict[k].to(tensor.dtype))
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def save_pretrained(self, save_directory, *, is_main_process: bool = True, state_dict=None, **kwargs):
        """The adapters in our format (`neat_fx.load_adapters` reads them), a model card (README.md), and the index
        a Trainer resumes from. `state_dict` is ignored: the adapters are read from nm."""
        if not is_main_process and not any_sharded(self._nm):
            return
        folder = Path(save_directory)
        save_adapters(self._nm, folder)
        if not is_main_process:
            return
        index = {
            "metadata": {"format": _native.FORMAT, "note": "written by neat_fx.hf; load with neat_fx.load_adapters"},
            "weight_map": {name: _native.WEIGHTS for name in _native.tensors_of(self._nm)},
        }
        write_text_atomic(folder / TRAINER_INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
        from .card import write_model_card

        write_model_card(folder, self._nm, base_model=self.name_or_path or None)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise ConfigError(
            "load NEAT adapters with neat_fx.load_adapters(model, folder, example_inputs=…) and wrap the result: "
            "neat_fx.hf.wrap(nm)"
        )


_WRAPPER_CLASSES: dict[type, type] = {}
_WRAPPER_LOCK = threading.Lock()


def _wrapper_class(model_class: type) -> type:
    """A subclass of EagerNeatModel per wrapped class: its forward carries the wrapped forward's signature (the
    Trainer reads the columns and label names from the class), its name the wrapped class's."""
    with _WRAPPER_LOCK:
        cls = _WRAPPER_CLASSES.get(model_class)
        if cls is None:

            @functools.wraps(EagerNeatModel.forward)
            def forward(self, *args, **kwargs):
                return EagerNeatModel.forward(self, *args, **kwargs)

            forward.__signature__ = inspect.signature(model_class.forward)
            del forward.__wrapped__  # inspect follows __wrapped__ before __signature__
            can = getattr(model_class, "can_generate", None)
            cls = type(
                f"Neat{model_class.__name__}",
                (EagerNeatModel,),
                {
                    "forward": forward,
                    "_can_generate": bool(callable(can) and can()),
                    "__module__": __name__,
                    "__doc__": f"{model_class.__name__} with NEAT adapters (neat_fx.hf.wrap).",
                },
            )
            _WRAPPER_CLASSES[model_class] = cls
        return cls


def wrap(nm: NeatModule) -> EagerNeatModel:
    """nm as the Hugging Face Trainer and TRL's trainers expect a model: hand `wrap(nm)` where a PEFT user hands a
    `PeftModel`. Shares nm's adapters (training it trains nm); writes nothing to nm or its model."""
    if isinstance(nm, EagerNeatModel):
        return nm
    if not isinstance(nm, NeatModule):
        raise ConfigError(f"wrap takes a NeatModule (what neat_fx.transform returns), got {type(nm).__name__}")
    if not isinstance(nm.model, PreTrainedModel):
        raise ConfigError(
            f"wrap needs a Hugging Face model (a transformers PreTrainedModel), got {type(nm.model).__name__}; "
            f"train other models with nm directly (any training loop)"
        )
    return _wrapper_class(type(nm.model))(nm)


def reference_model(nm: NeatModule | EagerNeatModel) -> nn.Module:
    """The base model (adapters off) as its own module object that shares every tensor with nm's model: the
    `ref_model` of TRL's DPO / KTO trainers with no second copy of the base. A trainer may patch it and switch it
    to eval; the model itself is not written."""
    if isinstance(nm, EagerNeatModel):
        nm = nm.neat_module
    if not isinstance(nm, NeatModule):
        raise ConfigError(f"reference_model takes a NeatModule or wrap(nm), got {type(nm).__name__}")
    view = base_view(nm.model, training=False)
    view.__dict__["config"] = copy.deepcopy(nm.model.config)
    return view


class NeatAdaptersCallback(TrainerCallback):
    """Saves `save_adapters(nm)` into `<output_dir>/checkpoint-<step>/neat_adapters` at every Trainer save, for
    `Trainer(model=nm)` (the captured graph; the Trainer's own `model.safetensors` holds nm's whole state). A
    wrapped model (`wrap(nm)`) needs no callback: its checkpoints are the adapters."""

    def on_save(self, args, state, control, model=None, **kwargs):
        nm = getattr(model, "module", model)  # unwrap DDP
        if isinstance(nm, EagerNeatModel):
            return control
        if not isinstance(nm, NeatModule):
            return control
        # Sharded (FSDP2): save_adapters is a collective, every rank calls it (rank 0 writes); else rank 0 only.
        if not state.is_world_process_zero and not any_sharded(nm):
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ADAPTERS_SUBFOLDER)
        save_adapters(nm, folder)
        return control
