"""One SFT run of tests/test_trainers.py::test_sft_two_processes_equals_one: TRL's SFTTrainer on `wrap(nm)` of the
tiny LLaMA, a fixed global batch of 8 rows for 3 steps. Run alone (one process, 8 rows per step) or under
`torch.distributed.run` with 2 processes (gloo, 4 rows each); rank 0 saves the adapters to OUT/adapters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(out: Path):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import neat_fx
    import neat_fx.hf

    import lm_fixture as F

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = F.make_tokenizer()
    model = F.make_model(tok, seed=0)
    example = dict(tok(["12+7=19", "3+4=7"], padding=True, return_tensors="pt"), use_cache=False)
    nm = neat_fx.transform(model, "all-linear", example_inputs=example, rank=4, seed=0)
    args = SFTConfig(
        output_dir=str(out / "run"),
        max_steps=3,
        per_device_train_batch_size=8 // world,
        learning_rate=0.5,
        optim="sgd",  # Adam's first steps turn rounding-level gradient differences into ±lr steps
        lr_scheduler_type="constant",
        bf16=False,  # TRL's default is bf16 autocast, whose rounding differs with the split of the batch
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    data = Dataset.from_list(F.addition(8, 0))  # one global batch: every step sees all 8 rows, in any order
    trainer = SFTTrainer(model=neat_fx.hf.wrap(nm), args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        neat_fx.save_adapters(nm, out / "adapters")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
