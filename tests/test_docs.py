"""The documentation cannot drift from the code: every Python block of README.md and docs/*.md runs (each page's
blocks in order, in one fresh process, against tiny random models where a page names a hub model: tests/docs_env.py),
and every decimal figure in a table appears in the committed results file the table names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = "benchmarks/results/"
FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block of `page`."""
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line)
        if m and lang is None:
            lang, start, lines = m.group(1), n + 1, []
        elif line.startswith("```") and lang is not None:
            if lang == "python":
                blocks.append((start, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


RUNNER = textwrap.dedent(
    """
    import sys, traceback
    sys.path.insert(0, {tests!r})
    import docs_env
    docs_env.install()
    namespace = {{"__name__": "__docs__"}}
    for line, code in {blocks!r}:
        print(f"--- block at {page}:{{line}}", flush=True)
        exec(compile(code, f"{page}:{{line}}", "exec"), namespace)
    print("--- all blocks ran", flush=True)
    """
)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_every_python_block_runs(page, tmp_path):
    blocks = python_blocks(page)
    script = tmp_path / "run_blocks.py"
    rel = page.relative_to(ROOT).as_posix()
    script.write_text(RUNNER.format(tests=str(ROOT / "tests"), blocks=blocks, page=rel))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0")
    env.update(WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="2", TRANSFORMERS_VERBOSITY="error")
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
    )
    assert r.returncode == 0 and "--- all blocks ran" in r.stdout, (r.stdout[-3000:], r.stderr[-5000:])


NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?|(?<![\w.])\d{1,3}(?:,\d{3})+")
LINK = re.compile(r"benchmarks/results/([\w./-]+\.(?:md|json|txt|log))")


def measured_tables(page: Path):
    """(line, source file or None, cells' text) of each table with decimal figures; the source is a results file
    linked in the row itself, else in the text just above the table."""
    lines = page.read_text().splitlines()
    n = 0
    while n < len(lines):
        if not lines[n].lstrip().startswith("|"):
            n += 1
            continue
        start = n
        while n < len(lines) and lines[n].lstrip().startswith("|"):
            n += 1
        above = " ".join(lines[max(0, start - 8) : start])
        above_links = LINK.findall(above)
        for i in range(start, n):
            row = lines[i]
            links = LINK.findall(row) or above_links
            cells = LINK.sub("", row)
            cells = re.sub(r"\]\([^)]*\)", "]", cells)  # link targets are not figures
            if NUMBER.search(cells):
                yield i + 1, tuple(dict.fromkeys(links)), cells


def test_every_figure_in_a_table_comes_from_a_results_file():
    problems = []
    for page in PAGES:
        for line, sources, cells in measured_tables(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if not sources:
                problems.append(f"{where}: a table with figures names no {RESULTS} file above it or in the row")
                continue
            absent = [s for s in sources if not (ROOT / RESULTS / s).exists()]
            if absent:
                problems.append(f"{where}: {', '.join(RESULTS + s for s in absent)} does not exist")
                continue
            # a figure must be in one of the files the row names (else those named just above the table)
            texts = [(ROOT / RESULTS / s).read_text() for s in sources]
            missing = [x for x in NUMBER.findall(cells) if not any(x in t for t in texts)]
            if missing:
                problems.append(f"{where}: {missing} not in {' or '.join(RESULTS + s for s in sources)}")
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "From [r](benchmarks/results/serving.md):\n\n| a | b |\n| - | - |\n| x | 357.7 |\n| y | 999.25 |\n\n"
        "```python\nx = 1\n```\n"
    )
    rows = list(measured_tables(page))
    assert [r[1] for r in rows] == [("serving.md",), ("serving.md",)]
    text = (ROOT / RESULTS / "serving.md").read_text()
    assert "357.7" in text and "999.25" not in text
    assert python_blocks(page) == [(9, "x = 1")]
