"""Where the main job's data comes from: --data, else $NEAT_FX_SST2, else the subset bundled with the package (so
`make demo` runs in a clone with nothing beside it and no network); `--data hub` reads GLUE SST-2 from the hub."""

from __future__ import annotations

import builtins

import pytest

from neat_fx import finetune
from neat_fx.errors import NeatError


def test_the_bundled_subset_is_the_default(monkeypatch):
    monkeypatch.delenv(finetune.DATA_ENV, raising=False)
    train, test, source = finetune.load_sst2(None, 4000)
    assert (len(train), len(test)) == (4000, 872)
    assert "bundled" in source and str(finetune.BUNDLED_SST2) in source
    assert {label for _, label in train} == {0, 1} and 0.45 < sum(label for _, label in train) / 4000 < 0.65
    assert len(finetune.load_sst2(None, 100)[0]) == 100


def test_a_folder_and_the_environment_come_first(tmp_path, monkeypatch):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nfine\t1\n")
    monkeypatch.setenv(finetune.DATA_ENV, str(tmp_path))
    train, test, source = finetune.load_sst2(None, 4000)
    assert (train, test) == ([("good", 1), ("bad", 0)], [("fine", 1)]) and source.startswith("$NEAT_FX_SST2")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(NeatError, match="needs train.tsv and test.tsv"):
        finetune.load_sst2(other, 10)


def test_hub_without_datasets_or_network_says_what_to_do(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(NeatError, match="--data hub.*leave --data out for the bundled subset"):
        finetune.load_sst2(finetune._data_arg("hub"), 10)
    assert finetune._data_arg("./hub") == finetune.Path("hub") != finetune.HUB  # a folder named hub is a folder
