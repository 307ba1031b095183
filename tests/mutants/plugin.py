"""A pytest plugin that injects one realistic bug into neat_fx, named by $NEAT_FX_MUTANT (tests/mutants/run.py
runs each against the test file that should catch it: `pytest -p mutants.plugin`). Without the variable it
does nothing. Each mutant is a function that monkeypatches neat_fx for the whole session."""

from __future__ import annotations

import os

MUTANTS = {}


def mutant(fn):
    MUTANTS[fn.__name__] = fn
    return fn


def _bypass_adapters(graph, keep=lambda node: False):
    """Every adapter call in `graph` (call_module adapters.*) replaced by its input y (the base op's output)."""
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("adapters.") and not keep(node):
            node.replace_all_uses_with(node.args[2])
            graph.erase_node(node)


@mutant
def unit_drops_adapter():
    """A block unit (neat_fx.units) runs its layer without the layer's adapters."""
    from neat_fx import units

    real = units.split_graph

    def split_graph(graph, names):
        out = real(graph, names)
        for sub in out.blocks.values():
            _bypass_adapters(sub)
        return out

    units.split_graph = split_graph


@mutant
def generation_ignores_adapters():
    """neat_fx.generate runs the base model's own weights (the adapted weights are never swapped in)."""
    import importlib

    gen = importlib.import_module("neat_fx.generate")
    real = gen.adapted_weights

    def adapted_weights(module):
        out = real(module)
        return {} if isinstance(module, gen.NeatModule) else out

    gen.adapted_weights = adapted_weights


@mutant
def int4_exports_base_weights():
    """to_onnx(..., quantize="int4") exports the model the adapters sit on, without them."""
    import importlib

    export = importlib.import_module("neat_fx.export")
    api = importlib.import_module("neat_fx.export.api")
    gen = importlib.import_module("neat_fx.generate")
    real = api.to_onnx

    def to_onnx(module, *args, **kwargs):
        if kwargs.get("quantize") == "int4" and isinstance(module, (gen.NeatModule, gen.FoldedModule)):
            module = gen.source_model(module)
        return real(module, *args, **kwargs)

    api.to_onnx = export.to_onnx = to_onnx


@mutant
def mixed_batch_adapter0():
    """AdapterBank with adapter_names=[...]: every row runs adapter 0."""
    import torch

    from neat_fx import serving

    real = serving.AdapterBank._row_groups

    def _row_groups(self, index):
        groups = real(self, index)
        return [(0, rows, None if per_row is None else torch.zeros_like(per_row)) for _, rows, per_row in groups]

    serving.AdapterBank._row_groups = _row_groups


@mutant
def fold_skips_a_site():
    """fold / merge_into leave the first site's weight as W0 (its ΔW never added)."""
    import importlib

    fold = importlib.import_module("neat_fx.fold")  # (neat_fx.fold is the function)
    real = fold.folded_weight

    def folded_weight(nm, site):
        first = min(s.key for s in nm.site_infos)
        return nm.weight_of(site).detach().clone() if site.key == first else real(nm, site)

    fold.folded_weight = folded_weight


@mutant
def load_loses_a_tensor():
    """Reading a saved adapter folder loses one tensor: the first site's B reads as zeros (its init)."""
    from neat_fx.io import native

    real = native.read

    def read(folder):
        loaded = real(folder)
        if loaded.sites:
            first = loaded.sites[min(loaded.sites)]
            first["B"] = first["B"].new_zeros(first["B"].shape)
        return loaded

    native.read = read


@mutant
def verification_compares_model_with_itself():
    """The ONNX export's verification compares PyTorch's outputs with themselves, not with ONNX Runtime's."""
    from neat_fx.export import decoder, onnx_export

    for module in (onnx_export, decoder):
        real = module.compare
        module.compare = lambda expected, actual, *a, _real=real, **k: _real(expected, expected, *a, **k)


@mutant
def compile_drops_adapter_grad():
    """The compile backend lowers every site with its adapter's tensors detached: no gradient reaches them."""
    from neat_fx import compiler

    def detached(v):
        if isinstance(v, (list, tuple)):
            return type(v)(detached(t) for t in v)
        return v.detach() if hasattr(v, "detach") else v

    real_apply, real_mat = compiler.neat_apply, compiler._materialised_weight

    def neat_apply(x, *rest, **kwargs):
        return real_apply(x, *(detached(v) for v in rest), **kwargs)

    def materialised(weight, *rest):
        return real_mat(weight, *(detached(v) for v in rest))

    compiler.neat_apply, compiler._materialised_weight = neat_apply, materialised


@mutant
def generate_leaves_train_mode():
    """neat_fx.generate runs the view in the model's own mode: dropout on while generating from a model in training."""
    import importlib

    gen = importlib.import_module("neat_fx.generate")
    real = gen.adapted_view

    def adapted_view(model, weights):
        view = real(model, weights)
        return view.train(model.training)

    gen.adapted_view = adapted_view


@mutant
def units_not_rebuilt_after_merge():
    """The per-layer units keep the graph they were split from after merge_into rewrites nm's graph in place."""
    from neat_fx import containers

    real = containers.NeatModule._runner

    def _runner(self, mode):
        return self._runners.get(mode) or real(self, mode)

    containers.NeatModule._runner = _runner


@mutant
def backend_depth4_wrong_layers():
    """backend(adapters=DIR) folds depth >= 4 adapters with the encoder and decoder r×r layers swapped."""
    from neat_fx import compiler

    def _served_weight(spec, args):
        _, index, consts, hidden, activation, scale, layout = spec
        A, B, layers = consts[0], consts[1], consts[2:]
        return compiler.neat_fold(args[index], A, B, layers[hidden:], layers[:hidden], activation, scale, layout)

    compiler._served_weight = _served_weight


def pytest_configure(config):
    name = os.environ.get("NEAT_FX_MUTANT")
    if name:
        if name not in MUTANTS:
            raise SystemExit(f"unknown mutant {name!r}: {', '.join(MUTANTS)}")
        MUTANTS[name]()
