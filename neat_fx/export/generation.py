"""`neat_fx.export.generate`: text generation from a with-past ONNX decoder (`to_onnx(...,
task="text-generation-with-past")`, or any file with Optimum's input/output names) in ONNX Runtime.

The key/value cache stays in ONNX Runtime values between steps (IOBinding): on CPU, files whose attention is all
GroupQueryAttention get one buffer per layer bound as both past and present, written in place (`_Cache`); other
files get each step's `present.*` outputs bound as the next step's `past_key_values.*` inputs, so on CUDA the
cache never leaves the device. Only the logits come to the host to pick the next token.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from neat_fx.errors import GenerationError
from neat_fx.generate import check_prompts, check_sampling

from . import runtime

META_PREFIX = "neat_fx.generation."
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class _Layout:
    """What the session's inputs say about the cache: names, heads, head sizes, dtype."""

    def __init__(self, sess):
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = [o.name for o in sess.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        self.past = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2] != "key"),
        )
        if missing or not self.past or "logits" not in outputs:
            raise GenerationError(
                f"this ONNX model is not a decoder exported with its cache (inputs {sorted(inputs)}, outputs "
                f"{outputs}): generate needs input_ids, attention_mask, past_key_values.* and logits; export with "
                f"to_onnx(..., task='text-generation-with-past')"
            )
        self.present = [n.replace("past_key_values.", "present.", 1) for n in self.past]
        absent = [n for n in self.present if n not in outputs]
        if absent:
            raise GenerationError(f"the ONNX model has past inputs without matching outputs: {absent[:3]}")
        self.position_ids = "position_ids" in inputs
        self.shapes = {}
        for n in self.past:
            shape = inputs[n].shape
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
                raise GenerationError(f"{n} has shape {shape}; expected [batch, heads, past length, head size]")
            self.shapes[n] = (shape[1], shape[3])
        self.dtype = _NUMPY.get(inputs[self.past[0]].type, np.float32)
        self.ids_dtype = np.int32 if inputs["input_ids"].type == "tensor(int32)" else np.int64
        self.logits_index = outputs.index("logits")


def _session_device(sess) -> str:
    return "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def generate(
    session_or_path,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    timings: dict | None = None,
):
    """Generate from a with-past ONNX decoder; returns the prompt followed by the new tokens, `[batch, prompt +
    new]` (NumPy int64, or a torch tensor if the ids were one), like Hugging Face `generate`.

    session_or_path: an `onnxruntime.InferenceSession` or a path (opened with `neat_fx.export.session` on
                     `device`, with `threads` intra-op threads).
    input_ids, attention_mask: NumPy arrays or torch tensors `[batch, length]`; prompts of different lengths
                     padded on the left (mask 0). Without a mask every token counts.
    do_sample=False is greedy; True samples with `temperature`, `top_k`, `top_p` from a NumPy generator seeded
    with `seed`. A row stops after `eos_token_id` (default: the id the export recorded from the model's
    generation config; `[]` never stops; an id outside the vocabulary never comes) and is filled with
    `pad_token_id` (default: recorded, else the EOS). Pad and EOS ids may lie outside the vocabulary: the model is
    fed an id inside it at padded positions and after a row stops; an unmasked prompt id outside it is refused.
    timings: a dict to fill with `prefill_s`, `decode_s` and `decode_steps` (the cost of the first call and of
    the cached steps after it).
    """
    ort = runtime._ort()
    sess = session_or_path
    if not isinstance(sess, ort.InferenceSession):
        if not isinstance(session_or_path, (str, os.PathLike)):
            raise GenerationError(
                f"generate takes an onnxruntime.InferenceSession or the path of an ONNX file, got "
                f"{type(session_or_path).__name__}"
            )
        sess = runtime.session(session_or_path, device, threads=threads)
    layout = _Layout(sess)
    as_torch = isinstance(input_ids, torch.Tensor)
    ids_t = torch.as_tensor(np.asarray(input_ids) if not as_torch else input_ids.cpu())
    mask_t = None
    if attention_mask is not None:
        mask_t = torch.as_tensor(
            np.asarray(attention_mask) if not isinstance(attention_mask, torch.Tensor) else attention_mask.cpu()
        )
    check_prompts(ids_t, mask_t, max_new_tokens, owner="the ONNX model")
    check_sampling(do_sample, temperature, top_p, top_k)
    meta = sess.get_modelmeta().custom_metadata_map
    limit = meta.get(META_PREFIX + "max_positions", "")
    if limit and ids_t.shape[1] + max_new_tokens > int(limit):
        raise GenerationError(
            f"a prompt of {ids_t.shape[1]} tokens (padding included) + max_new_tokens={max_new_tokens} needs "
            f"{ids_t.shape[1] + max_new_tokens} positions; this file's rotary table holds {limit} (the model's "
            f"max_position_embeddings): shorten the prompt or max_new_tokens"
        )
    eos = _eos(eos_token_id, meta)
    pad = _pad(pad_token_id, meta, eos)
    rng = np.random.default_rng(seed)

    ids = ids_t.numpy().astype(np.int64)
    mask = (mask_t.numpy() if mask_t is not None else np.ones_like(ids)).astype(np.int64)
    vocab = _vocab_size(sess, meta, layout)
    # what the model is fed where a token carries nothing (padding, rows already done): an id inside the vocabulary,
    # as a pad or EOS id outside it (GPT-2's 50256 on a smaller table, a pad token added without resizing) cannot
    # be looked up; the returned ids keep the caller's own
    filler = pad if vocab is None or 0 <= pad < vocab else 0
    fed = _fed_prompt(ids, mask, vocab, filler)
    batch = ids.shape[0]
    where = _session_device(sess)
    cache = _Cache(sess, layout, meta, batch, ids.shape[1] + max_new_tokens, where)
    step_ids = fed
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)
    new = []
    done = np.zeros(batch, dtype=bool)
    clock = time.perf_counter()
    spent = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
    for step in range(max_new_tokens):
        binding = cache.binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(step_ids, dtype=layout.ids_dtype))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=layout.ids_dtype))
        if layout.position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=layout.ids_dtype))
        sess.run_with_iobinding(binding)
        logits = cache.advance(binding)[:, -1]
        token = _sample(logits, rng, temperature, top_k, top_p) if do_sample else logits.argmax(-1)
        token = np.where(done, pad, token).astype(np.int64)
        new.append(token)
        done |= np.isin(token, eos)
        now = time.perf_counter()
        if step == 0:
            spent["prefill_s"] = now - clock
        else:
            spent["decode_s"] += now - clock
            spent["decode_steps"] += 1
        clock = now
        if done.all():
            break
        step_ids = np.where(done, filler, token)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        positions = mask.sum(-1, keepdims=True) - 1
    if timings is not None:
        timings.update(spent)
    out = np.concatenate([ids, np.stack(new, 1)], 1)
    return torch.from_numpy(out) if as_torch else out


class _Cache:
    """The key/value cache between steps, held by ONNX Runtime.

    In place (files whose every present.* comes from GroupQueryAttention — the export records
    `cache_in_place` — on CPU): one zeroed buffer per past input, [batch, heads, prompt + new tokens, head size],
    bound as that input and as its present output, once; the op writes each step's keys and values into it at
    their position, so nothing is copied or allocated per step. Otherwise: each step's present outputs, allocated
    by ONNX Runtime on the session's device, are bound as the next step's past inputs."""

    def __init__(self, sess, layout: _Layout, meta: dict, batch: int, length: int, where: str):
        ort = runtime._ort()
        self.sess, self.layout, self.where = sess, layout, where
        # CUDA: GroupQueryAttention's in-place path with an attention bias is not checked on a GPU here
        self.in_place = meta.get(META_PREFIX + "cache_in_place") == "1" and where == "cpu"
        size = length if self.in_place else 0
        self.past = {
            n: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, size, d), layout.dtype), where, 0)
            for n, (h, d) in layout.shapes.items()
        }
        self._bound = None
        # a [batch, 1, vocab] logits file (logits="last"): in place, one host array receives every step's logits
        shape = sess.get_outputs()[layout.logits_index].shape
        self.logits = None
        if self.in_place and len(shape) == 3 and shape[1] == 1 and isinstance(shape[2], int):
            dtype = _NUMPY.get(sess.get_outputs()[layout.logits_index].type, np.float32)
            self.logits = np.zeros((batch, 1, shape[2]), dtype)

    def binding(self):
        """The step's IOBinding with the cache and the logits bound (the caller binds ids, mask, positions)."""
        if self._bound is not None:
            return self._bound
        ort = runtime._ort()
        binding = self.sess.io_binding()
        if self.logits is not None:
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # ONNX Runtime writes into the array
            binding.bind_ortvalue_output("logits", self._logits_value)
        else:
            binding.bind_output("logits", "cpu")  # first: get_outputs() lists the outputs in binding order
        for past, present in zip(self.layout.past, self.layout.present):
            binding.bind_ortvalue_input(past, self.past[past])
            if self.in_place:
                binding.bind_ortvalue_output(present, self.past[past])
            else:
                binding.bind_output(present, self.where, 0)
        if self.in_place:
            self._bound = binding
        return binding

    def advance(self, binding) -> np.ndarray:
        """After a run: the logits [batch, positions, vocab] as float32 on the host (valid until the next run);
        the presents become the next step's past."""
        if self.logits is not None:
            logits = self.logits
        else:
            outputs = binding.get_outputs()
            if not self.in_place:
                self.past = dict(zip(self.layout.past, outputs[1:]))
            logits = outputs[0].numpy()
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)


def _vocab_size(sess, meta: dict, layout: _Layout) -> int | None:
    """The rows of the model's embedding table: recorded by the export, else the width of the logits."""
    recorded = meta.get(META_PREFIX + "vocab_size", "")
    if recorded:
        return int(recorded)
    width = sess.get_outputs()[layout.logits_index].shape[-1]
    return width if isinstance(width, int) and width > 0 else None


def _fed_prompt(ids: np.ndarray, mask: np.ndarray, vocab: int | None, filler: int) -> np.ndarray:
    """The prompt ids as the model is fed them: padded positions (mask 0) outside the vocabulary become `filler`
    (the mask hides them); a real token outside it is refused."""
    if vocab is None:
        return ids
    outside = (ids < 0) | (ids >= vocab)
    bad = outside & (mask != 0)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise GenerationError(
            f"input_ids[{row}, {col}] = {int(ids[row, col])} lies outside the model's vocabulary of {vocab} ids "
            f"(0…{vocab - 1}) and is not masked: tokenize with the model's own tokenizer, or set attention_mask to 0 "
            f"where the id is padding"
        )
    return np.where(outside, filler, ids)


def _eos(eos_token_id, meta: dict) -> np.ndarray:
    if eos_token_id is None:
        recorded = meta.get(META_PREFIX + "eos_token_id", "")
        eos_token_id = [int(e) for e in recorded.split(",") if e]
    if isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
        eos_token_id = [int(eos_token_id)]
    if not isinstance(eos_token_id, (list, tuple)) or not all(isinstance(e, (int, np.integer)) for e in eos_token_id):
        raise GenerationError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
    return np.asarray(eos_token_id, dtype=np.int64)


def _pad(pad_token_id, meta: dict, eos: np.ndarray) -> int:
    if pad_token_id is not None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)):
            raise GenerationError(f"pad_token_id must be an int, got {pad_token_id!r}")
        return int(pad_token_id)
    recorded = meta.get(META_PREFIX + "pad_token_id", "")
    if recorded:
        return int(recorded)
    return int(eos[0]) if len(eos) else 0


def _sample(logits: np.ndarray, rng, temperature: float, top_k: int | None, top_p: float) -> np.ndarray:
    """One token per row from softmax(logits / temperature), cut to the top_k tokens and to the smallest set
    whose probability reaches top_p (Hugging Face's order: temperature, top-k, top-p)."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.partition(z, -min(top_k, z.shape[-1]), axis=-1)[:, -min(top_k, z.shape[-1]), None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = sorted_p.cumsum(-1) - sorted_p < top_p  # a token stays while the mass before it is short
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])
