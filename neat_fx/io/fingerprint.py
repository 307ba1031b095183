"""Fingerprints of base weights: saved with adapters, checked when they are loaded or served, because an adapter
is only valid on the exact base it was trained on (H = σ(W0ᵀ A) depends on W0)."""

from __future__ import annotations

import hashlib
import json

import torch

from ..distributed import full_tensor


def fingerprint(weight: torch.Tensor, n: int = 16) -> dict:
    """A few values at fixed positions and the norm: tells a different base model from this one, while a
    bf16/fp16 copy of the same weights still matches (compared with a tolerance)."""
    flat = full_tensor(weight).detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, steps=min(n, flat.numel())).round().long().to(flat.device)
    return {
        "shape": list(weight.shape),
        "sample": [float(v) for v in flat[idx].float().cpu()],
        "norm": float(flat.float().norm()),
    }


def fingerprint_matches(saved: dict, weight: torch.Tensor) -> bool:
    """Whether `weight` is (a same-shape, possibly lower-precision copy of) the weight `saved` was taken of."""
    now = fingerprint(weight, len(saved["sample"]))
    if now["shape"] != saved["shape"]:
        return False
    a = torch.tensor(saved["sample"], dtype=torch.float64)
    b = torch.tensor(now["sample"], dtype=torch.float64)
    scale = max(float(a.abs().max()), 1e-12)
    if not torch.allclose(a, b, rtol=2e-2, atol=1e-3 * scale):
        return False
    return abs(saved["norm"] - now["norm"]) <= 2e-2 * max(abs(saved["norm"]), 1e-12)


def base_fingerprint(site_fingerprints: dict[str, dict]) -> str:
    """A short name of a whole base model, as far as adapters are concerned: 16 hex digits of the sha256 of the
    JSON (sorted keys) of `{site name: fingerprint(W0)}` over the adapted sites — the same from a live module
    (`nm.weight_of(site)`) as from a saved folder (neat_config.json records each site's fingerprint). A name, not a
    check: a bf16 copy of the same base gets another one, which `fingerprint_matches` would accept."""
    text = json.dumps(site_fingerprints, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
