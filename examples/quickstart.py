"""The README's quickstart as a script: transform → train → save / load → fold → merge → export ONNX.

    python examples/quickstart.py                 # a small BERT with random weights (runs offline, in seconds)
    python examples/quickstart.py --model DIR     # a Hugging Face sequence classifier you have on disk

Synthetic task: the label is whether the sentence's first token is in the lower half of the vocabulary —
learnable, so the loss visibly falls.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import neat_fx


def build_model(model_dir: Path | None):
    import transformers

    transformers.logging.set_verbosity_error()
    if model_dir is not None:
        return transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def batches(n: int, batch: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, (ids[:, 0] < vocab // 2).long()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a Hugging Face model folder (default: a small random BERT)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", type=Path, help="where to write adapters and ONNX (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="neat_fx_quickstart_"))
    model = build_model(args.model)
    vocab = model.config.vocab_size

    batch, _ = next(batches(1, 8, 16, vocab))
    nm = neat_fx.transform(
        model,
        ["*query", "*value"],
        example_inputs=batch,
        rank=8,
        depth=2,
        activation="relu",
        scale=1.0,
        trainable=["classifier*"],
    )  # a new head, trained in full
    print(nm.summary())

    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for inputs, labels in batches(args.steps, 16, 16, vocab, seed=1):
        loss = torch.nn.functional.cross_entropy(nm(**inputs).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    k = max(1, len(losses) // 5)
    print(f"loss: first {k} steps {sum(losses[:k]) / k:.3f} → last {k} {sum(losses[-k:]) / k:.3f}")

    nm.eval()
    neat_fx.save_adapters(nm, out / "adapters")
    reloaded = neat_fx.load_adapters(
        build_model(args.model) if args.model else _same_base(model, nm), out / "adapters", example_inputs=batch
    )
    folded = neat_fx.fold(nm)
    neat_fx.merge_into(model, nm)
    probe, _ = next(batches(1, 5, 12, vocab, seed=2))
    with torch.no_grad():
        want = nm(**probe).logits
        for name, m in (("reloaded", reloaded.eval()), ("folded", folded.eval()), ("merged", model.eval())):
            print(f"max |Δ logits| {name:8s} vs nm: {(m(**probe).logits - want).abs().max():.2e}")
    from neat_fx.export import to_onnx

    try:
        report = to_onnx(folded, batch, out / "model.onnx")
    except ImportError as exc:  # the core install: the error names the extra to install
        print(f"ONNX export skipped: {exc}")
        return 0
    print(report)
    return 0


def _same_base(model, nm):
    """A fresh copy of the base (W0) the adapters were trained on: merge_into is about to change `model`."""
    import copy

    base = copy.deepcopy(model)
    with torch.no_grad():
        for s in nm.sites():
            base.get_parameter(s.name).copy_(nm.weight_of(s))
    return base


if __name__ == "__main__":
    raise SystemExit(main())
