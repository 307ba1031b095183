"""The README's quickstart, as the runnable script examples/quickstart.py, end to end."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "20", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = {m.group(1): float(m.group(2)) for m in re.finditer(r"max \|Δ logits\| (\w+)\s+vs nm: (\S+)", r.stdout)}
    assert set(diffs) == {"reloaded", "folded", "merged"} and max(diffs.values()) <= 1e-5, r.stdout
    assert "verified on cpu" in r.stdout
    assert (tmp_path / "adapters" / "neat_config.json").exists() and (tmp_path / "model.onnx").exists()
