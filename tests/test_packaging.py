"""The package as a release ships it: every sub-package and data file in the wheel, one version, imports from the
installed wheel outside the repository, and an extra's module without its extra names the install to run.
(.ci/wheel_check.sh goes further in CI: `python -m build`, a fresh venv, the quickstart on the core and [onnx]
installs.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import neat_fx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return next(dist.glob("neat_fx-*.whl"))


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "neat_fx").rglob("*.py")}
    assert any(n.startswith("neat_fx/io/") for n in tree) and any(n.startswith("neat_fx/export/") for n in tree)
    assert tree - names == set(), "modules missing from the wheel"
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "neat_fx" / "data").rglob("*") if p.is_file()}
    assert {"neat_fx/data/sst2/train.tsv", "neat_fx/data/sst2/test.tsv"} <= data
    assert data - names == set(), "data files missing from the wheel"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "export/"))], "only the package ships"


def test_one_version_source(wheel):
    assert wheel.name.startswith(f"neat_fx-{neat_fx.__version__}-")
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    assert f"Version: {neat_fx.__version__}\n" in zipfile.ZipFile(wheel).read(meta).decode()
    assert "version =" not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]


def test_installed_wheel_imports_every_module_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import importlib, pkgutil, neat_fx\n"
        "mods = [m.name for m in pkgutil.walk_packages(neat_fx.__path__, 'neat_fx.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "from neat_fx import finetune\n"
        "print(neat_fx.__file__, len(mods), len(finetune.read_tsv(finetune.BUNDLED_SST2 / 'train.tsv')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    where, n_modules, rows = out.stdout.split()
    assert where.startswith(str(site)) and int(n_modules) >= 40 and int(rows) == 4000


@pytest.mark.parametrize(
    "blocked, call, extra",
    [
        (
            "onnx",
            "from neat_fx.export import to_onnx; to_onnx(torch.nn.Linear(4, 4), (torch.ones(2, 4),), 'm.onnx')",
            "neat-fx[onnx]",
        ),
        ("onnxruntime", "from neat_fx.export import session; session('m.onnx')", "neat-fx[onnx]"),
        ("transformers", "import neat_fx.hf", "pip install transformers"),
    ],
)
def test_an_extra_missing_names_the_install(blocked, call, extra, tmp_path):
    code = f"import sys; sys.modules[{blocked!r}] = None\nimport torch, neat_fx\n{call}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "ImportError" in out.stderr and extra in out.stderr, out.stderr[-2000:]


def test_documented_submodules_are_attributes_after_import_neat_fx(tmp_path):
    code = (
        "import sys, neat_fx\n"
        "assert 'neat_fx.hf' not in sys.modules and 'onnx' not in sys.modules\n"
        "print(neat_fx.hf.NeatAdaptersCallback.__name__, neat_fx.export.to_onnx.__name__, neat_fx.hf.wrap.__name__,"
        " neat_fx.card.write_model_card.__name__)\n"
        "try:\n    neat_fx.no_such_thing\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    first = out.stdout.split("\n")[0]
    assert first == "NeatAdaptersCallback to_onnx wrap write_model_card" and "no_such_thing" in out.stdout
