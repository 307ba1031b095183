"""A transformed Hugging Face model inside transformers.Trainer and under Accelerate."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import neat_fx

import zoo
from helpers import max_diff

transformers = pytest.importorskip("transformers")


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (n, 10), generator=g)
    labels = (ids[:, 0] > 60).long()  # learnable from the first token
    return [dict(input_ids=i, attention_mask=torch.ones_like(i), labels=y) for i, y in zip(ids, labels)]


def test_trainer_trains_evaluates_checkpoints_and_loads_best(tmp_path):
    from neat_fx.hf import ADAPTERS_SUBFOLDER, NeatAdaptersCallback

    model, _, _, patterns = zoo.bert()
    train, evald = data(32, 0), data(16, 1)
    example = transformers.default_data_collator(train[:4])  # with labels: the loss is part of the graph
    nm = neat_fx.transform(model, patterns, example, rank=4, seed=0, trainable=["classifier*"])
    before = copy.deepcopy({k: v.clone() for k, v in nm.state_dict().items() if k.startswith("adapters.")})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=[],
        use_cpu=True,
        logging_steps=2,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=nm, args=args, train_dataset=train, eval_dataset=evald, callbacks=[NeatAdaptersCallback()]
    )
    result = trainer.train()
    assert result.global_step == 6 and result.training_loss > 0
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) >= 3
    best = Path(trainer.state.best_model_checkpoint)
    assert (best / ADAPTERS_SUBFOLDER / "neat_config.json").exists()
    # load_best_model_at_end put the best checkpoint's adapters back into nm
    saved = neat_fx.load_adapters(
        neat_fx.transform(zoo.bert()[0], patterns, example, rank=4, seed=0, trainable=["classifier*"]),
        best / ADAPTERS_SUBFOLDER,
    )
    assert max_diff(saved.adapters.state_dict(), nm.adapters.state_dict()) == 0.0
    assert any(not torch.equal(v, nm.state_dict()[k]) for k, v in before.items())  # training moved them
    metrics = trainer.evaluate()
    assert abs(metrics["eval_loss"] - trainer.state.best_metric) < 1e-6


def test_accelerate_prepare_trains_like_a_plain_loop():
    accelerate = pytest.importorskip("accelerate")
    model, _, _, patterns = zoo.bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = transformers.default_data_collator(data(8, 0))
    results = []
    for use_accelerate in (False, True):
        nm = neat_fx.transform(copy.deepcopy(model), patterns, batch, rank=4, seed=0, trainable=["classifier*"])
        opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
        if use_accelerate:
            acc = accelerate.Accelerator(cpu=True)
            nm_run, opt = acc.prepare(nm, opt)
        else:
            nm_run = nm
        for _ in range(3):
            loss = nm_run(**batch).loss
            opt.zero_grad()
            acc.backward(loss) if use_accelerate else loss.backward()
            opt.step()
        results.append({k: v.detach().clone() for k, v in nm.adapters.state_dict().items()})
    assert max_diff(results[0], results[1]) < 1e-7
