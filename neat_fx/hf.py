"""Hugging Face Trainer integration: `NeatAdaptersCallback` writes the adapters (neat_fx format) into every
Trainer checkpoint folder, beside the Trainer's own `model.safetensors` (which holds nm's whole state, so
`load_best_model_at_end` and `resume_from_checkpoint` work unchanged).

    nm = neat_fx.transform(model, ["*query", "*value"], dict(batch, labels=labels))   # labels: the loss is in the graph
    args = TrainingArguments(..., remove_unused_columns=False, label_names=["labels"])
    Trainer(model=nm, args=args, ..., callbacks=[NeatAdaptersCallback()]).train()

`remove_unused_columns=False` and `label_names=["labels"]`: the Trainer reads both from the signature of the
model's class, and nm's forward takes whatever the captured model takes (*args, **kwargs).
"""

from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError(
        "neat_fx.hf integrates with the Hugging Face Trainer and needs transformers: pip install transformers"
    ) from None

from .containers import NeatModule
from .distributed import any_sharded
from .io import save_adapters

ADAPTERS_SUBFOLDER = "neat_adapters"


class NeatAdaptersCallback(TrainerCallback):
    """Saves `save_adapters(nm)` into `<output_dir>/checkpoint-<step>/neat_adapters` at every Trainer save."""

    def on_save(self, args, state, control, model=None, **kwargs):
        nm = getattr(model, "module", model)  # unwrap DDP
        if not isinstance(nm, NeatModule):
            return control
        # Sharded (FSDP2): save_adapters is a collective, every rank calls it (rank 0 writes); else rank 0 only.
        if not state.is_world_process_zero and not any_sharded(nm):
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ADAPTERS_SUBFOLDER)
        save_adapters(nm, folder)
        return control
