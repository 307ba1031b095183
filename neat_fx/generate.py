"""Generation from a transformed (or folded) decoder, with a KV cache.

The captured graphs are cache-free (decoders are captured with `use_cache=False`), so generating through them
would recompute the whole prefix for every new token. Instead `generate` runs the model's own `generate()` —
its own cache classes, sliding windows, soft-capping and stopping rules — on a view of the model (`adapted_view`:
a shallow copy of its module tree whose adapted attributes hold `W0 + ΔW`, sharing every other tensor, in eval
mode). Nothing of the model is written, so other threads may run the model, or generate from it, meanwhile. ΔW
is computed from the adapters as they are at the call, so the tokens always follow the latest training step; the
cost of one new token is the model's own cached decode step.
(docs/design.md, "Generation")
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch
from torch import nn

from . import capture as cap
from . import quantized
from .containers import FoldedModule, NeatModule, tensor_version
from .errors import GenerationError
from .fold import folded_weight

#: config fields that bound the positions a model can embed (learned tables: GPT-2's n_positions).
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length")

# one fold at a time per process: concurrent first calls fold once and share the cached weights
_FOLD_LOCK = threading.Lock()


def _state_key(module: NeatModule) -> tuple | None:
    """Identity and version counter of every tensor W0 + ΔW is computed from (None if one has no counter: an
    inference tensor): equal keys mean the same adapted weights."""
    tensors = [module.base_tensor(s) for s in module.site_infos]  # the held tensor (quantized: not a fresh copy)
    tensors += [t for ad in module.adapters.values() for t in ad.parameters()]
    tensors += list(module.trainable.parameters())
    key = tuple((id(t), t.data_ptr(), t.device, tensor_version(t)) for t in tensors)
    return None if any(k[-1] is None for k in key) else key


def cached_adapted_weights(module: NeatModule) -> dict[str, torch.Tensor]:
    """`adapted_weights(module)`, kept on the module while no tensor it is computed from changes (optimizer steps,
    load_adapters, merge_into and `copy_` move version counters; a write through `.data` does not: call
    `generate(..., keep_folded=False)` once after one)."""
    with _FOLD_LOCK:
        key = _state_key(module)
        cached = module.__dict__.get("_generation_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        module.__dict__.pop("_generation_cache", None)  # freed before the new fold: one copy at a time
        weights = adapted_weights(module)
        if key is not None:
            module.__dict__["_generation_cache"] = (key, weights)
        return weights


def adapted_view(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    *,
    classes: dict[int, tuple[type, dict]] | None = None,
    own_hooks: bool = False,
    training: bool | None = False,
    refuse_offloaded: bool = True,
) -> nn.Module:
    """`model` computing with `weights` (by attribute path) in place of its own tensors, in eval mode, without
    writing to it: a shallow copy of the module tree — new module objects, each with its own attribute dict,
    parameter, buffer and child tables and training flag — sharing every tensor with the model (no weight is
    copied). A module reached by two paths is one module in the view. The tensors go where
    `torch.func.functional_call` would put them (the parameter or buffer table, else a plain attribute).

    For the eager adapters (neat_fx.eager): `classes` gives some modules (by id) another class in the view and
    extra attributes; `own_hooks` gives each view module its own hook tables (holding the model's hooks), so
    hooks registered on the view stay off the model; `training=None` keeps each module's flag;
    `refuse_offloaded=False` accepts accelerate's offload hooks (they write W0 into the view, which the eager
    adapters read as W0)."""
    views: dict[int, nn.Module] = {}
    classes = classes or {}

    def view_of(module: nn.Module) -> nn.Module:
        done = views.get(id(module))
        if done is not None:
            return done
        cls, extra = classes.get(id(module), (type(module), {}))
        new = views[id(module)] = object.__new__(cls)
        if refuse_offloaded:
            _refuse_offloaded(module)
        state = dict(module.__dict__)
        if own_hooks:
            for key, value in state.items():
                if "hooks" in key and isinstance(value, dict):
                    state[key] = type(value)(value)
        state.update(extra)
        for key, value in state.items():  # a forward wrapped around the module (accelerate's hooks) runs the view
            if isinstance(value, types.MethodType) and value.__self__ is module:
                state[key] = types.MethodType(value.__func__, new)
            elif isinstance(value, functools.partial) and _binds(value, module):
                state[key] = _rebound(value, module, new)
        state["_parameters"] = dict(module._parameters)
        state["_buffers"] = dict(module._buffers)
        state["_modules"] = {k: None if c is None else view_of(c) for k, c in module._modules.items()}
        if training is not None:
            state["training"] = training
        new.__dict__.update(state)
        return new

    root = view_of(model)
    for path, tensor in weights.items():
        owner, _, name = path.rpartition(".")
        module = root.get_submodule(owner)
        if name in module._parameters:
            module._parameters[name] = tensor
        elif name in module._buffers:
            module._buffers[name] = tensor
        else:
            module.__dict__[name] = tensor
    return root


def _binds(call: functools.partial, module: nn.Module) -> bool:
    return any(a is module for a in call.args) or any(v is module for v in call.keywords.values())


def _rebound(call: functools.partial, module: nn.Module, new: nn.Module) -> functools.partial:
    """`call` with `new` wherever it was bound to `module` (positionally: accelerate's `partial(new_forward, module)`;
    by keyword: transformers' `partial(custom_generate, model=self)`), keeping what `functools.update_wrapper` put on
    it (`__wrapped__`: generate() reads the forward's signature through it to build position ids)."""
    args = tuple(new if a is module else a for a in call.args)
    keywords = {k: new if v is module else v for k, v in call.keywords.items()}
    out = functools.partial(call.func, *args, **keywords)
    out.__dict__.update(call.__dict__)
    return out


def _refuse_offloaded(module: nn.Module):
    """accelerate's offload hooks write the offloaded weights (W0) into the module's tables before each forward,
    which would overwrite W0 + ΔW in the view: refused rather than silently generating with the base weights."""
    hook = module.__dict__.get("_hf_hook")
    hooks = getattr(hook, "hooks", (hook,)) if hook is not None else ()
    if any(getattr(h, "offload", False) for h in hooks):
        raise GenerationError(
            f"{type(module).__name__} has accelerate's offload hook (device_map with 'cpu'/'disk' offload): its "
            f"weights are written in from the offload store at every call, so generation cannot use W0 + ΔW; load "
            f"the model without offload, or generate from neat_fx.fold(nm) / a merged copy"
        )


def adapted_weights(module: NeatModule | FoldedModule) -> dict[str, torch.Tensor]:
    """The tensors to use in place of the model's own, by attribute path in the model: `W0 + ΔW` of every site
    at the paths its linear uses read it through (a tied embedding keeps W0), and the parameters trained in
    full. For a folded module: every tensor it holds, at the model's paths."""
    if isinstance(module, NeatModule):
        _refuse_untieable(module.site_infos)
        out: dict[str, torch.Tensor] = {}
        for site in module.site_infos:
            weight = folded_weight(module, site)
            for path in site.linear_paths or site.aliases or (site.name,):
                out[path] = weight
        for key, name in module.trainable_names.items():
            base = module.model.get_parameter(name)
            out[name] = module.trainable[key].detach().to(base.dtype)
        return out
    if module.__dict__.get("_source_model") is None:  # capture_plain: its `model` is the model itself
        return {}
    _refuse_untieable(module.__dict__.get("_site_infos", ()))
    out = dict(module.model.named_parameters(remove_duplicate=False))
    out.update(module.model.named_buffers(remove_duplicate=False))
    out.update({path: cap.resolve_attr(module, attr) for path, attr in module.__dict__["_linear_paths"].items()})
    return out


def _refuse_untieable(sites):
    both = [s.name for s in sites if s.shared_with_other_ops and not s.linear_paths]
    if both:
        raise GenerationError(
            f"{', '.join(both)} is read as a linear weight and by other ops through the same attribute, so the "
            f"model's own code cannot be given W0 + ΔW for the linear uses only; transform with "
            f"exclude={both!r} to generate"
        )


def source_model(module) -> nn.Module:
    """The model whose code generates for `module` (a NeatModule's model, the model a folded module came from)."""
    if isinstance(module, NeatModule):
        return module.model
    if isinstance(module, FoldedModule):
        source = module.__dict__.get("_source_model")
        return source if source is not None else module.model
    raise GenerationError(
        f"generate expects a NeatModule (neat_fx.transform) or a FoldedModule (neat_fx.fold), got "
        f"{type(module).__name__}; for a plain Hugging Face model call its own generate()."
    )


@torch.no_grad()
def generate(
    module: NeatModule | FoldedModule,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    keep_folded: bool = True,
    **generate_kwargs,
):
    """Generate from a transformed or folded Hugging Face decoder LM with a KV cache.

    Returns what Hugging Face `generate` returns: the prompt followed by the new tokens, `[batch, prompt +
    new]`, a row padded with `pad_token_id` once it has produced `eos_token_id`. Batches of prompts of
    different lengths are left-padded (`tokenizer.padding_side = "left"`) with an `attention_mask`.
    `do_sample=False` is greedy decoding; `do_sample=True` samples with `temperature`, `top_p`, `top_k`
    (seed with `torch.manual_seed`). Other keyword arguments go to the model's `generate` unchanged
    (`repetition_penalty=`, `return_dict_in_generate=`, …).

    The adapters are folded into the weights (`W0 + ΔW`) from their current values: train a step and the next
    call follows it. With `keep_folded=True` (default) a NeatModule keeps the folded weights between calls
    while nothing they come from changes (version counters: optimizer steps, load_adapters, merge_into), at
    the memory of one fold; `keep_folded=False` folds at this call and keeps nothing. The model runs in eval
    mode (no dropout). Nothing of the model is written (it runs as `adapted_view`, with its own training flags):
    other threads may run the model, or generate from the same module, while this call runs.
    """
    model = source_model(module)
    _check_generative(model)
    input_ids, attention_mask = _check_prompts(model, input_ids, attention_mask, max_new_tokens)
    check_sampling(do_sample, temperature, top_p, top_k)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=True,
        **generate_kwargs,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k is not None else 0)
    else:  # a model's generation_config may carry sampling defaults that would only warn with greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    elif getattr(model.generation_config, "pad_token_id", None) is None:
        eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if eos and eos[0] is not None:  # HF's own fallback, without its warning
            kwargs["pad_token_id"] = eos[0]
    if isinstance(module, NeatModule) and keep_folded:
        weights = cached_adapted_weights(module)
    else:
        with _FOLD_LOCK:
            module.__dict__.pop("_generation_cache", None)
        weights = adapted_weights(module)
    # bitsandbytes layers compute as DequantizedLinear: their own forward takes no plain W0 + ΔW (neat_fx.quantized)
    view = adapted_view(model, weights, classes=quantized.view_classes(model))
    with _quiet_generation():
        return view.generate(**kwargs)


def _check_generative(model: nn.Module):
    can = getattr(model, "can_generate", None)
    if not callable(getattr(model, "generate", None)) or not callable(can) or not can():
        raise GenerationError(
            f"{type(model).__name__} cannot generate text: generate needs a Hugging Face language model with a "
            f"generation head (…ForCausalLM, …LMHeadModel, …ForConditionalGeneration); an encoder or a classifier "
            f"has none. Evaluate it by calling the module instead."
        )


def _check_prompts(model: nn.Module, input_ids, attention_mask, max_new_tokens):
    device = next((p.device for p in model.parameters()), getattr(input_ids, "device", None))
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = next((getattr(text, k) for k in POSITION_LIMITS if isinstance(getattr(text, k, None), int)), None)
    input_ids, attention_mask = check_prompts(input_ids, attention_mask, max_new_tokens, limit, type(model).__name__)
    return input_ids.to(device), None if attention_mask is None else attention_mask.to(device)


def check_prompts(input_ids, attention_mask, max_new_tokens, position_limit: int | None = None, owner="the model"):
    """Validate a generation request (shared by `generate` and the ONNX runner): a positive integer
    max_new_tokens, 2-D integer ids, a 0/1 mask of the same shape padded on the left only, with a token in each
    row, and room in the position table. Returns the ids and mask (unchanged tensors)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    integer = (torch.int64, torch.int32)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in integer:
        what = f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor) else input_ids
        raise GenerationError(
            f"input_ids must be a 2-D integer tensor [batch, prompt length], got {what}; one prompt: ids[None]"
        )
    if input_ids.shape[1] == 0:
        raise GenerationError("input_ids holds empty prompts (length 0); give each row at least one token")
    batch, length = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise GenerationError(
                f"attention_mask has shape {got}, input_ids {tuple(input_ids.shape)}: they must match (1 = token, "
                f"0 = padding)"
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise GenerationError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = attention_mask.long()
        if bool((mask.sum(1) == 0).any()):
            raise GenerationError(f"attention_mask row {int((mask.sum(1) == 0).nonzero()[0])} has no token (all 0)")
        right = (mask[:, 1:] < mask[:, :-1]).any(1)
        if bool(right.any()):
            raise GenerationError(
                f"attention_mask row {int(right.nonzero()[0])} has padding after its tokens: decoder generation "
                f"needs the padding on the left (tokenizer.padding_side = 'left'), where new tokens do not follow it"
            )
    if position_limit is not None and length + max_new_tokens > position_limit:
        raise GenerationError(
            f"the prompt ({length} tokens, padding included) plus max_new_tokens={max_new_tokens} is "
            f"{length + max_new_tokens} positions, more than {owner}'s position table holds "
            f"({position_limit}); shorten the prompt or ask for fewer tokens"
        )
    return input_ids, attention_mask


def check_sampling(do_sample, temperature, top_p, top_k):
    if not do_sample:
        return
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise GenerationError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise GenerationError(f"top_k must be a non-negative integer or None, got {top_k!r}")


_QUIET_LOCK = threading.Lock()
_quiet = {"calls": 0, "level": None}  # calls running quietly, and the verbosity the first of them found


@contextlib.contextmanager
def _quiet_generation():
    """transformers logs a notice per call for settings we choose on purpose (pad = eos). Its verbosity is
    process-wide: it is set by the first of concurrent calls and given back by the last one."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - generate() needs transformers anyway
        yield
        return
    with _QUIET_LOCK:
        if _quiet["calls"] == 0:
            _quiet["level"] = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        _quiet["calls"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["calls"] -= 1
            if _quiet["calls"] == 0:
                hf_logging.set_verbosity(_quiet["level"])
