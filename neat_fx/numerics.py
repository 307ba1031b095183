"""Comparing outputs: the one rule used to check a capture against the eager model and an exported ONNX model
against PyTorch. Differences are relative to each output's scale, max(1, max |expected|); integer outputs
must match exactly."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils import _pytree as pytree

#: the least relative tolerance for half-precision outputs (their rounding alone reaches it).
HALF_PRECISION_RTOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def flat_tensors(out) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in pytree order."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        return (t.float() if t.is_floating_point() else t).numpy()
    return np.asarray(t)


def _float_difference(e: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """(max |e - a| over finite positions, the output's scale); a NaN or infinity on one side only is an infinite
    difference, the same NaN or infinity on both sides none (NaN ≠ NaN would otherwise fail every check)."""
    finite = np.isfinite(e) & np.isfinite(a)
    agree = (np.isnan(e) & np.isnan(a)) | (np.isinf(e) & (e == a))
    if np.any(~finite & ~agree):
        return float("inf"), 1.0
    if not finite.any():
        return 0.0, 1.0
    return float(np.abs(e[finite] - a[finite]).max()), max(1.0, float(np.abs(e[finite]).max()))


def compare(expected, actual, rtol: float | None = None) -> dict:
    """{"max_abs", "max_rel", "ok"[, "note"]} of `actual` (tensors or arrays, in the order of `expected`'s
    flattened tensors) against `expected`. ok: every floating output within `rtol` (loosened for
    half-precision outputs) and integer outputs equal; with rtol=None, ok only checks structure and integers."""
    exp = flat_tensors(expected) if not isinstance(expected, list) else expected
    act = flat_tensors(actual) if not isinstance(actual, list) else actual
    if len(exp) != len(act):
        return {
            "max_abs": float("inf"),
            "max_rel": float("inf"),
            "ok": False,
            "note": f"{len(act)} outputs, expected {len(exp)}",
        }
    worst_abs, worst_rel, ok = 0.0, 0.0, True
    for e, a in zip(exp, act):
        floating = e.is_floating_point()
        e_np, a_np = _numpy(e), _numpy(a)
        if e_np.shape != a_np.shape:
            return {
                "max_abs": float("inf"),
                "max_rel": float("inf"),
                "ok": False,
                "note": f"shape {a_np.shape}, expected {e_np.shape}",
            }
        if not e_np.size:
            continue
        if not floating:
            if not np.array_equal(e_np, a_np):
                return {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "note": "integer outputs differ"}
            continue
        d, scale = _float_difference(e_np.astype(np.float64), a_np.astype(np.float64))
        rel = d / scale
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, rel)
        if rtol is not None:
            ok = ok and rel <= max(rtol, HALF_PRECISION_RTOL.get(e.dtype, 0.0))
    return {"max_abs": worst_abs, "max_rel": worst_rel, "ok": ok}
