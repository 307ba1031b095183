"""Issue 12, items 3 and 10: resume refuses another configuration, checkpoints are validated before anything is
restored (optimizer type and state shapes, corrupt trainer_state falls back to `.old`), and the CLI answers bad
arguments and library errors with one line on stderr and exit code 2, never a traceback. The CLI's --resume with
another configuration or a corrupt checkpoint: at the end of test_finetune.py's killed-run test."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_finetune import cli, write_data, write_model

import neat_fx
from neat_fx.checkpoint import STATE_JSON, STATE_TENSORS
from neat_fx.cli import main

import zoo

# -- item 3: load_checkpoint validates before it restores anything ------------------------------------------


def _trained(steps=2):
    model, ex, _, patterns = zoo.home_grown()
    nm = neat_fx.transform(model, patterns, ex, rank=2)
    opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = nm(*ex).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return nm, opt, ex


def _adapter_state(nm):
    return {k: v.detach().clone() for k, v in nm.state_dict().items() if "neat_" in k}


def _moved(nm):
    """Change every adapter tensor, so a load that wrote anything is visible."""
    with torch.no_grad():
        for p in nm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    return _adapter_state(nm)


def _unchanged(nm, before):
    after = _adapter_state(nm)
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_checkpoint_refuses_another_optimizer_type(tmp_path):
    nm, opt, _ = _trained()
    neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2)
    assert json.loads((tmp_path / "c" / STATE_JSON).read_text())["optimizer_class"] == "AdamW"
    before = _moved(nm)
    sgd = torch.optim.SGD([p for p in nm.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    with pytest.raises(neat_fx.AdapterMismatchError, match="AdamW.*SGD"):
        neat_fx.load_checkpoint(tmp_path / "c", nm, sgd)
    assert _unchanged(nm, before)
    assert not sgd.state  # nothing restored into the optimizer either


def test_checkpoint_refuses_wrong_shaped_optimizer_state(tmp_path):
    nm, opt, _ = _trained()
    folder = neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2)
    tensors = load_file(str(folder / STATE_TENSORS))
    key = next(k for k in tensors if k.endswith(".exp_avg") and tensors[k].dim() == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(folder / STATE_TENSORS))
    before = _moved(nm)
    fresh = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"exp_avg.*shape") as info:
        neat_fx.load_checkpoint(folder, nm, fresh)
    assert key.split(".")[1] in str(info.value)  # names the parameter's index
    assert _unchanged(nm, before) and not fresh.state


@pytest.mark.parametrize("name", [STATE_JSON, STATE_TENSORS])
def test_corrupt_trainer_state_falls_back_to_old_copy(tmp_path, name):
    nm, opt, _ = _trained()
    neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2)
    shutil.copytree(tmp_path / "c", tmp_path / "keep")
    saved = _adapter_state(nm)
    nm2, opt2, _ = _trained(steps=3)
    neat_fx.save_checkpoint(tmp_path / "c", nm2, opt2, step=3)
    shutil.copytree(tmp_path / "keep", tmp_path / "c.old")  # the step-2 copy, as a kill between renames leaves it
    path = tmp_path / "c" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    _moved(nm)
    state = neat_fx.load_checkpoint(
        tmp_path / "c", nm, torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad])
    )
    assert state["step"] == 2 and state["path"] == tmp_path / "c.old"
    assert _unchanged(nm, saved)


@pytest.mark.parametrize("name", [STATE_JSON, STATE_TENSORS])
def test_corrupt_trainer_state_without_old_copy_names_the_file(tmp_path, name):
    nm, opt, _ = _trained()
    neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2)
    path = tmp_path / "c" / name
    path.write_bytes(path.read_bytes()[:20])
    before = _moved(nm)
    with pytest.raises(neat_fx.AdapterMismatchError, match=name):
        neat_fx.load_checkpoint(tmp_path / "c", nm, opt)
    assert _unchanged(nm, before)


def test_trainer_state_missing_fields_is_named(tmp_path):
    nm, opt, _ = _trained()
    neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2)
    path = tmp_path / "c" / STATE_JSON
    meta = json.loads(path.read_text())
    del meta["signature"]
    path.write_text(json.dumps(meta))
    with pytest.raises(neat_fx.AdapterMismatchError, match="signature"):
        neat_fx.load_checkpoint(tmp_path / "c", nm, opt)


def test_checkpoint_expect_lists_every_difference(tmp_path):
    nm, opt, _ = _trained()
    neat_fx.save_checkpoint(tmp_path / "c", nm, opt, step=2, extra={"batch_size": 32, "lr": 1e-2, "seed": 0})
    before = _moved(nm)
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"(?s)batch_size: checkpoint 32, this run 4.*lr"):
        neat_fx.load_checkpoint(tmp_path / "c", nm, opt, expect={"batch_size": 4, "lr": 5e-3, "seed": 0})
    assert _unchanged(nm, before)
    assert neat_fx.load_checkpoint(tmp_path / "c", nm, opt, expect={"batch_size": 32, "lr": 1e-2})["step"] == 2


# -- the CLI: one line on stderr, exit code 2, no traceback ---------------------------------------------------


def _run(args, timeout=300):
    return subprocess.run(cli() + args, capture_output=True, text=True, timeout=timeout)


def _refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--batch-size", "0", "--batch-size"),
        ("--epochs", "0", "--epochs"),
        ("--train-rows", "0", "--train-rows"),
        ("--rank", "0", "--rank"),
        ("--lr", "0", "--lr"),
        ("--lr", "nan", "--lr"),
        ("--save-every", "-1", "--save-every"),
    ],
)
def test_bad_arguments_are_refused_up_front(tiny, tmp_path, capsys, option, value, needle):
    """argparse refuses them before anything runs: checked in process (test_cli.py runs the installed script)."""
    args = _finetune(tiny, tmp_path / "run")
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, (info.value.code, err[-3000:])
    assert "Traceback" not in err and needle in err, err[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_data(root / "data", 48, 16)
    write_model(root / "base")
    return root


def _finetune(root, out, *extra, data="data"):
    return [
        "finetune",
        "--model",
        str(root / "base"),
        "--data",
        str(root / data),
        "--train-rows",
        "48",
        "--batch-size",
        "8",
        "--max-len",
        "16",
        "--rank",
        "4",
        "--lr",
        "5e-3",
        "--save-every",
        "2",
        "--no-onnx",
        "--out",
        str(out),
        *extra,
    ]


def test_library_errors_are_one_line(tiny, tmp_path):
    r = _run(_finetune(tiny, tmp_path / "p", "--patterns", "*nothing_matches*"))
    _refused(r, "neat-fx finetune:", "*nothing_matches*")
    (tmp_path / "nohead").mkdir()
    for name in ("train.tsv", "test.tsv"):
        (tmp_path / "nohead" / name).write_text("the movie was good\t1\nbad plot\t0\n")
    r = _run(_finetune(tiny, tmp_path / "h", data=tmp_path / "nohead"))
    _refused(r, "neat-fx finetune:", "train.tsv", "sentence")


# Resume refusing another configuration or a corrupt checkpoint: checked at the end of
# test_finetune.py::test_killed_run_resumes_to_the_same_adapters, on the checkpoint that test's runs leave.
