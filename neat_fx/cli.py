"""`neat-fx`: the command line.

neat-fx --version
neat-fx finetune [--model DIR] [--data DIR] [--rank 8] … (the main job: train, fold, export, verify)
neat-fx export --model DIR --adapters DIR --out model.onnx [--fp16] [--optimize auto] [--device cpu]
neat-fx export --model DIR --adapters DIR_A DIR_B … --out model.onnx (one model, model.<folder>.onnx_adapter each)
neat-fx export --model DIR --adapters DIR --out lm.onnx --task text-generation-with-past [--quantize int4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: names of classification heads' weights, whose first dimension is the number of labels.
HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")

EXPORT_HELP = """\
Export a NEAT-tuned Hugging Face model to ONNX for ONNX Runtime.

Loads the base model from --model (a Hugging Face folder), the adapters from --adapters (saved by
neat_fx.save_adapters, or a PEFT PEANuT checkpoint), folds W0 + ΔW into the weights, exports with the
torch.onnx dynamo exporter (batch and sequence axes dynamic), optimises for ONNX Runtime and verifies
ONNX Runtime against PyTorch on two batches of different shapes before the file is renamed into place
(fp32 within 1e-4, fp16 within 1e-2 of each output's scale). Needs the extra `onnx` (or `gpu`).

With several --adapters folders: one fp32 model serving them all (nothing folded: each adapted site reads
its H and s·B as graph inputs whose defaults are zeros, so the bare model is the base model) and, beside
--out, <out stem>.<folder name>.onnx_adapter for each (ONNX Runtime's LoRA adapter format; run them with
neat_fx.export.AdapterSession or RunOptions.add_active_adapter). Each adapter is verified against PyTorch; each
file records the model it was written for, and AdapterSession refuses a file of another model.

With --task text-generation-with-past (a decoder LM): one file for prefill and cached decoding, its key/value
cache as inputs past_key_values.{i}.key/.value and outputs present.{i}.key/.value (Optimum's names), decoder
fusions where they apply, verified by logits and by greedy generation against the model's own generate; run
it with neat_fx.export.generate. --quantize int4 (MatMulNBits, --block-size 32 or 128) or int8 shrinks it.
"""


def _export(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    import neat_fx
    from neat_fx.export import to_onnx
    from neat_fx.export.config import TEXT_GENERATION_WITH_PAST

    transformers.logging.set_verbosity_error()
    if args.task != TEXT_GENERATION_WITH_PAST and (args.logits != "last" or args.attention != "auto"):
        print("neat-fx export: --logits and --attention apply to --task text-generation-with-past", file=sys.stderr)
        return 2
    if args.float_embedding and (args.quantize != "int4" or args.via != "neat_fx"):
        print("neat-fx export: --float-embedding applies to --quantize int4 (--via neat_fx)", file=sys.stderr)
        return 2
    folders = list(args.adapters)
    checks = [("--model", args.model, "config.json")] + [("--adapters", f, None) for f in folders]
    for flag, folder, marker in checks:
        if not Path(folder).is_dir() or (marker and not (Path(folder) / marker).is_file()):
            what = "a Hugging Face model folder (with config.json)" if marker else "the folder save_adapters wrote"
            print(f"neat-fx export: {flag} {folder} is not {what}", file=sys.stderr)
            return 2
    saved_all = []
    for folder in folders:
        try:
            saved_all.append(neat_fx.read_adapters(folder))
        except (OSError, neat_fx.NeatError) as exc:
            print(f"neat-fx export: --adapters {folder}: {exc}", file=sys.stderr)
            return 2
    class_name, num_labels = next((s.base_model for s in saved_all if s.base_model), None), args.num_labels
    for s in saved_all:
        for name, tensor in s.trainable.items():
            if num_labels is None and name.endswith(HEAD_WEIGHTS):
                num_labels = tensor.shape[0]
    cls = getattr(transformers, class_name, None) if class_name else None
    if cls is None and args.task == "text-generation-with-past":
        cls = transformers.AutoModelForCausalLM
    elif cls is None:
        cls = transformers.AutoModelForSequenceClassification if num_labels else transformers.AutoModel
    kwargs = {"num_labels": num_labels} if num_labels else {}
    try:
        model = cls.from_pretrained(args.model, **kwargs).eval()
    except Exception as exc:
        print(f"neat-fx export: cannot load a {cls.__name__} from {args.model}: {exc}", file=sys.stderr)
        return 2
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    example = _example_inputs(args.model, model, args.batch_size, args.seq_len)
    options = dict(optimize=args.optimize, device=args.device, approximate=args.approximate)
    if args.task or args.quantize or args.via != "neat_fx":
        options.update(task=args.task, quantize=args.quantize, block_size=args.block_size, via=args.via)
    if args.float_embedding:
        options.update(quantize_embedding=False)
    if args.task == TEXT_GENERATION_WITH_PAST:
        options.update(logits=args.logits, attention=args.attention)
    dtype = "fp16" if args.fp16 else "fp32"
    try:
        if len(folders) > 1:  # one model, one ONNX Runtime adapter file per folder (named after it) beside --out
            report = to_onnx(model, example, args.out, adapters=folders, dtype=dtype, **options)
        else:
            nm = neat_fx.load_adapters(model, folders[0], example_inputs=example)
            report = to_onnx(nm, example, args.out, dtype=dtype, **options)
    except (neat_fx.NeatError, FileNotFoundError, FileExistsError, IsADirectoryError) as exc:
        print(f"neat-fx export: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _example_inputs(model_dir, model, batch: int, seq: int):
    import torch

    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        texts = ["an example sentence to trace the model with"] * batch
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    except Exception:
        vocab = getattr(model.config, "vocab_size", 1000)
        g = torch.Generator().manual_seed(0)
        return {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }


def main(argv=None) -> int:
    from neat_fx.export.config import (  # (no ONNX import: the options' one home)
        ATTENTION,
        DEVICES,
        INT4_BLOCK_SIZES,
        LOGITS,
        OPTIMIZE,
        QUANTIZE,
        ROUTES,
        TEXT_GENERATION_WITH_PAST,
    )

    from . import __version__

    parser = argparse.ArgumentParser(
        prog="neat-fx",
        description=(
            "NEAT for any PyTorch model as a compiler pass: capture the graph, match linear ops by "
            "pattern, insert NEAT adapters, train them, fold W0 + ΔW into the weights, export ONNX."
        ),
    )
    parser.add_argument("--version", action="version", version=f"neat-fx {__version__}")
    sub = parser.add_subparsers(dest="command")
    from . import finetune

    ft = sub.add_parser(
        "finetune",
        help="fine-tune with NEAT, fold, export ONNX and verify (the main job)",
        description=finetune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_arguments(ft)
    ex = sub.add_parser(
        "export",
        help="fold adapters into a Hugging Face model and export verified ONNX",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--model", required=True, help="Hugging Face model folder (the base the adapters were trained on)")
    ex.add_argument(
        "--adapters",
        required=True,
        nargs="+",
        help="adapter folder from neat_fx.save_adapters (or PEFT PEANuT); several folders: one ONNX model serving "
        "them all, with <out stem>.<folder name>.onnx_adapter beside --out for each (ONNX Runtime's LoRA adapters)",
    )
    ex.add_argument(
        "--out", required=True, help="the ONNX file to write, e.g. model.onnx (with --via genai: a new or empty folder)"
    )
    ex.add_argument("--fp16", action="store_true", help="fp16 weights and math, float32 inputs and outputs")
    ex.add_argument(
        "--optimize",
        default="auto",
        choices=OPTIMIZE,
        help="auto: exact rewrites (unread positions skipped, attention scale in the query weights, "
        "attention as MatMul/Softmax) + ONNX Runtime optimisations saved offline (default); "
        "fusions: also attention/skip-LayerNorm/bias-GELU fusions; exporter: the exporter's "
        "optimiser only; none",
    )
    ex.add_argument("--approximate", action="store_true", help="GELU tanh approximation (faster; drift reported)")
    ex.add_argument("--device", default="cpu", choices=DEVICES, help="where ONNX Runtime verifies the model")
    ex.add_argument(
        "--task",
        choices=[TEXT_GENERATION_WITH_PAST],
        help="text-generation-with-past: a decoder LM with its key/value cache as inputs/outputs (one file for "
        "prefill and decoding, verified by greedy generation)",
    )
    ex.add_argument(
        "--quantize",
        choices=[q for q in QUANTIZE if q],
        help="int8: dynamic int8 MatMul weights (CPU); int4: weight-only 4-bit MatMulNBits (CPU and CUDA)",
    )
    ex.add_argument(
        "--block-size", type=int, default=32, choices=INT4_BLOCK_SIZES, help="int4 weights per scale (default 32)"
    )
    ex.add_argument(
        "--float-embedding",
        action="store_true",
        help="with --quantize int4: leave the token embedding table float (a larger file, nearer fp32; no speed cost)",
    )
    ex.add_argument(
        "--logits",
        default="last",
        choices=LOGITS,
        help="with --task text-generation-with-past: logits at the last position only (default: what generation "
        "reads) or at every position (scoring)",
    )
    ex.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION,
        help="with --task text-generation-with-past: GroupQueryAttention where the layer is known (default; the report "
        "lists each layer's path) or the model's own attention on every layer",
    )
    ex.add_argument(
        "--via",
        default="neat_fx",
        choices=ROUTES,
        help="neat_fx (default); optimum (Optimum's exporter, transformers < 4.58); genai (onnxruntime-genai's "
        "model builder on the merged model: a folder onnxruntime_genai runs)",
    )
    ex.add_argument(
        "--num-labels", type=finetune.positive_int, help="classification labels (default: from the saved head)"
    )
    ex.add_argument(
        "--batch-size", type=finetune.positive_int, default=2, help="example batch used to trace (default 2)"
    )
    ex.add_argument(
        "--seq-len", type=finetune.positive_int, default=64, help="example sequence length used to trace (default 64)"
    )
    args = parser.parse_args(argv)  # bad arguments: argparse's message and exit code 2
    commands = {"export": _export, "finetune": finetune.run}
    if args.command not in commands:
        parser.print_help()
        return 0
    from .errors import NeatError

    try:
        return commands[args.command](args)
    except NeatError as exc:  # the library's own errors say what is wrong and how to fix it: no traceback
        print(f"neat-fx {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
