"""The model card of an adapter folder: `README.md` beside the adapters, as PEFT writes one — YAML front matter
(library, base model, tags) for the Hugging Face hub, then what the adapters are, what they fit, how they were
trained and scored, and how to load them. Markdown only; the same inputs give the same text."""

from __future__ import annotations

import json
from pathlib import Path

from ._version import __version__
from .atomic import write_text_atomic
from .distributed import is_rank_zero
from .io.fingerprint import base_fingerprint, fingerprint

#: the card's file name in the adapter folder (what the Hugging Face hub shows).
CARD = "README.md"
#: the folder in the card's loading snippet: the card does not know where its folder will be read from.
FOLDER_PLACEHOLDER = "path/to/adapters"
TAGS = ("neat", "peft-style", "neat-fx")


def model_card(nm, *, base_model=None, data=None, metrics=None, training=None) -> str:
    """The model card (markdown) of the adapters of the NeatModule `nm`.

    base_model: the hub id or folder the base model was loaded from (default: the Hugging Face config's
    `name_or_path`, if any); data: a description of the training data; metrics: {name: value} of the final
    evaluation; training: {setting: value} of the run (learning rate, steps, ...)."""
    if base_model is None:
        base_model = getattr(getattr(nm.model, "config", None), "name_or_path", None) or None
    base_model = None if base_model is None else str(base_model)
    model_class = type(nm.model).__name__
    c = nm.neat_config
    sites = nm.sites()
    base = base_fingerprint({s.name: fingerprint(nm.weight_of(s)) for s in sites})
    trainable, total = nm.parameter_counts()
    full = sorted(nm.trainable_names.values())

    front = ["---", "library_name: neat-fx"]
    if base_model:
        front.append(f"base_model: {_yaml(base_model)}")
    front += ["tags:", *(f"- {t}" for t in TAGS), "---", ""]
    lines = front + [
        f"# NEAT adapters for {base_model or model_class}",
        "",
        "NEAT adapters (nonlinear parameter-efficient adaptation, arXiv 2410.01870) trained with "
        "[neat-fx](https://pypi.org/project/neat-fx/): at each adapted weight W0 a small network learns "
        "ΔW = s · B σ(W0ᵀ A)ᵀ. Fold or merge W0 + ΔW into the weights to deploy the base model's own graph.",
        "",
        "## Base model",
        "",
        f"- model: `{base_model}` (`{model_class}`)"
        if base_model
        else f"- model: a `{model_class}` (built from a config)",
        f"- base fingerprint: `{base}` (the base weights at the adapted sites; the adapters fit this base only, "
        f"and loading checks each site's weight)",
        "",
        "## Adapters",
        "",
        _table(
            ("option", "value"),
            {
                "patterns": ", ".join(f"`{p}`" for p in c.patterns),
                **({"exclude": ", ".join(f"`{p}`" for p in c.exclude)} if c.exclude else {}),
                "rank": c.rank,
                "depth": c.depth,
                "activation": c.activation,
                "scale": f"{c.scale:g}",
                "sites": len(sites),
                "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f} %)",
                **({"trained in full": ", ".join(f"`{n}`" for n in full)} if full else {}),
            },
        ),
        "",
    ]
    if data is not None:
        lines += ["## Training data", "", _one_line(str(data)), ""]
    if training:
        lines += ["## Training settings", "", _table(("setting", "value"), training), ""]
    if metrics:
        lines += ["## Metrics", "", _table(("metric", "value"), metrics), ""]
    lines += ["## How to load", "", "```python", *_snippet(nm, base_model, model_class, base), "```", ""]
    lines += [f"Framework versions: neat-fx {__version__}", ""]
    return "\n".join(lines)


def write_model_card(folder, nm, *, base_model=None, data=None, metrics=None, training=None) -> Path:
    """Write `model_card(nm, ...)` to `folder`/README.md, atomically (a temporary file renamed into place: a
    reader sees the previous card or the new one). Returns the file. Call it after `save_adapters(nm, folder)`;
    under FSDP2 on every rank, as `save_adapters` (fingerprints gather sharded weights): rank 0 writes."""
    text = model_card(nm, base_model=base_model, data=data, metrics=metrics, training=training)
    path = Path(folder) / CARD
    if not is_rank_zero():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def _snippet(nm, base_model: str | None, model_class: str, base: str) -> list[str]:
    load = f"nm = neat_fx.load_adapters(model, {json.dumps(FOLDER_PLACEHOLDER)}, example_inputs=example_inputs)"
    inputs = "# example_inputs: a batch (2 rows or more) of the model's inputs, as neat_fx.transform was given"
    if base_model and type(nm.model).__module__.startswith("transformers.") and hasattr(nm.model, "from_pretrained"):
        config = getattr(nm.model, "config", None)
        labels = getattr(config, "num_labels", None) if "Classification" in model_class else None
        extra = f", num_labels={labels}" if labels else ""
        return [
            "import transformers",
            "",
            "import neat_fx",
            "",
            f"model = transformers.{model_class}.from_pretrained({json.dumps(base_model)}{extra})",
            inputs,
            load,
        ]
    return [
        "import neat_fx",
        "",
        f"# model: a {model_class} with the base weights above (base fingerprint {base})",
        inputs,
        load,
    ]


def _table(header: tuple[str, str], values: dict) -> str:
    rows = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    rows += [f"| {_cell(k)} | {_cell(_value(v))} |" for k, v in values.items()]
    return "\n".join(rows)


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _cell(text) -> str:
    return _one_line(str(text)).replace("|", "\\|")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _yaml(text: str) -> str:
    """A YAML scalar: a JSON string is a valid YAML double-quoted one (any path or id, quoted safely)."""
    return json.dumps(text)
