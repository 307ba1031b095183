"""Parameter names: the one place that knows how a weight's name relates to its module and to an adapter key."""

from __future__ import annotations

WEIGHT_SUFFIX = ".weight"


def module_name(param_name: str) -> str:
    """`encoder.layer.0.query.weight` → `encoder.layer.0.query`; a bare parameter name is returned as is."""
    return param_name[: -len(WEIGHT_SUFFIX)] if param_name.endswith(WEIGHT_SUFFIX) else param_name


def pattern_candidates(param_name: str) -> tuple[str, ...]:
    """The names a pattern is tried against: the parameter's, and its module's for a `.weight`."""
    stem = module_name(param_name)
    return (param_name,) if stem == param_name else (param_name, stem)


def adapter_key(param_name: str) -> str:
    """The key of a site's adapter in `nm.adapters` (a ModuleDict key may not contain dots)."""
    return module_name(param_name).replace(".", "__")
