"""The Hugging Face model with `W0 + ΔW` merged, for the routes that hand a model folder to another exporter
(`via="optimum"`, `via="genai"`): a copy, so the caller's NeatModule, FoldedModule and model stay as they are."""

from __future__ import annotations

import copy

import torch
from torch import nn

from neat_fx.containers import FoldedModule, NeatModule


def merged_copy(module: nn.Module, route: str = "this route") -> nn.Module:
    """A transformers model computing what `module` computes, with the adapted weights written in.

    module: a NeatModule (its model is copied and `merge_into` writes W0 + ΔW into the copy: tied heads are
            untied and the tie metadata fixed), a FoldedModule (a copy of the model it was folded from, with the
            folded tensors in place of the model's own; a head tied to the embedding gets its own parameter), or a
            plain model with `save_pretrained` (returned as it is: the routes only read it).
    route:  named in the error raised for a module that is not a Hugging Face model.
    """
    if isinstance(module, NeatModule):
        from neat_fx.fold import merge_into

        return merge_into(_frozen_copy(module.model), module)
    if isinstance(module, FoldedModule):
        return _folded_copy(module, route)
    if not hasattr(module, "save_pretrained"):
        raise TypeError(
            f"{route} exports Hugging Face models (with save_pretrained); {type(module).__name__} is not one. "
            f"Use via='neat_fx' (the default), which exports any module."
        )
    return module


def _frozen_copy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


@torch.no_grad()
def _folded_copy(module: FoldedModule, route: str) -> nn.Module:
    from neat_fx.fold import _record_untied
    from neat_fx.generate import adapted_weights, source_model

    source = source_model(module)
    if not hasattr(source, "save_pretrained"):
        raise TypeError(
            f"{route} exports Hugging Face models; this FoldedModule was folded from a "
            f"{type(source).__name__}, which has no save_pretrained. Use via='neat_fx' (the default)."
        )
    own = dict(source.named_parameters(remove_duplicate=False))
    own.update(source.named_buffers(remove_duplicate=False))
    changed = {path: t for path, t in adapted_weights(module).items() if own.get(path) is not t}
    if not changed:  # a plain capture (nothing folded): the model itself
        return source
    out = _frozen_copy(source)
    paths_of: dict[int, list[str]] = {}
    for path, p in out.named_parameters(remove_duplicate=False):
        paths_of.setdefault(id(p), []).append(path)
    untied: list[str] = []
    new_params: dict[int, nn.Parameter] = {}  # id(folded tensor) -> the parameter made for it
    for path, value in changed.items():
        target = out.get_parameter(path) if path in own and isinstance(own[path], nn.Parameter) else None
        if target is None:  # a buffer
            out.get_buffer(path).copy_(value.to(out.get_buffer(path).device))
            continue
        sharers = paths_of[id(target)]
        if all(changed.get(s) is value for s in sharers):  # every path reading it gets this value: write in place
            target.copy_(value.to(target.device, target.dtype))
            continue
        # tied to a path that keeps W0 (an output head tied to the input embedding): a parameter of its own
        param = new_params.get(id(value))
        if param is None:
            param = new_params[id(value)] = nn.Parameter(
                value.detach().to(target.device, target.dtype, copy=True), requires_grad=False
            )
        owner, _, field = path.rpartition(".")
        setattr(out.get_submodule(owner), field, param)
        untied.append(path)
    if untied:
        _record_untied(out, tuple(untied))
    return out
