"""On a lent GPU: ONNX Runtime CUDA EP (when the machine's onnxruntime has it) vs PyTorch CUDA eager on the
same card, fp16 and fp32, a MiniLM-shaped BERT (random weights), batch 1 and 32 × 64 padded tokens.
Prints JSON; without a CUDA EP it says so and verifies the fp16 export on the CPU EP instead."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main():
    import onnxruntime as ort
    import transformers

    from neat_fx.export import BoundRunner, session, to_onnx

    res = {"providers": ort.get_available_providers(), "onnxruntime": ort.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name()}
    cuda_ep = "CUDAExecutionProvider" in res["providers"]
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()

    def batch(b):
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(1000, 20000, (b, 64), generator=g)
        mask = torch.ones(b, 64, dtype=torch.long)
        for i, n in enumerate(torch.randint(16, 65, (b,), generator=g).tolist()):
            mask[i, n:] = 0
        return dict(input_ids=ids, attention_mask=mask)

    folder = Path(tempfile.mkdtemp())
    for dtype in ("fp32", "fp16"):
        entry = {}
        m = model.to("cuda", torch.float16 if dtype == "fp16" else torch.float32)
        ex = {k: v.cuda() for k, v in batch(2).items()}
        t = time.perf_counter()
        report = to_onnx(m, ex, folder / f"{dtype}.onnx", dtype=dtype, device="cuda" if cuda_ep else "cpu")
        entry["export_s"] = round(time.perf_counter() - t, 1)
        entry["parity_max_rel"] = report.max_rel_diff
        entry["fused_ops"] = report.fused_ops
        entry["verified_on"] = report.device
        if cuda_ep:
            sess = session(report.path, "cuda")
            for b in (1, 32):
                x = batch(b)
                runner = BoundRunner(sess, {k: v.numpy() for k, v in x.items()})
                xc = {k: v.cuda() for k, v in x.items()}
                for name, fn in (("ort_cuda", runner), ("torch_cuda", lambda: m(**xc))):
                    with torch.no_grad():
                        for _ in range(10):
                            fn()
                        torch.cuda.synchronize()
                        ts = []
                        for _ in range(50):
                            t = time.perf_counter()
                            fn()
                            torch.cuda.synchronize()
                            ts.append((time.perf_counter() - t) * 1e3)
                    entry[f"{name}_b{b}_ms"] = round(statistics.median(ts), 3)
                entry[f"ort_over_torch_b{b}"] = round(entry[f"ort_cuda_b{b}_ms"] / entry[f"torch_cuda_b{b}_ms"], 3)
        res[dtype] = entry
        print(json.dumps({dtype: entry}), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
