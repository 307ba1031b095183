"""Adapters on disk under attack (issue 12): kills at every rename, hand-edited and truncated files, NaN/inf,
paths outside the folder. Each test failed on the code before the hardening."""

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import neat_fx
from neat_fx.io.writing import same_tensors

import zoo
from helpers import randomize_adapters

CONFIG, WEIGHTS = "neat_config.json", "adapters.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def nm():
    model, example, _, patterns = zoo.bert()
    nm = neat_fx.transform(
        model, patterns, example, rank=4, depth=6, activation="relu", scale=0.5, trainable=["classifier*"], seed=1
    )
    randomize_adapters(nm, std=0.3)
    return nm


@pytest.fixture(scope="module")
def saved(nm, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    neat_fx.save_adapters(nm, root / "ad")
    return root / "ad"


def state(nm):
    return {k: v.detach().clone() for k, v in nm.state_dict().items()}


def unchanged(before, nm):
    after = state(nm)
    return all(torch.equal(before[k], after[k]) for k in before)


def flat(loaded):
    """Every tensor of a LoadedAdapters, by a stable key."""
    out = {}
    for name, s in loaded.sites.items():
        out[name + ".A"], out[name + ".B"] = s["A"], s["B"]
        for part in ("encoders", "decoders"):
            for i, t in enumerate(s[part]):
                out[f"{name}.{part}.{i}"] = t
    out.update({"trainable." + k: v for k, v in loaded.trainable.items()})
    out["scale"] = torch.tensor([loaded.config.scale], dtype=torch.float64)
    return out


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_config(folder, edit):
    meta = json.loads((folder / CONFIG).read_text())
    edit(meta)
    (folder / CONFIG).write_text(json.dumps(meta))


def rewrite_weights(folder, edit, name=WEIGHTS):
    """Change the tensors by hand and record their new checksum: a checksum-consistent, hand-built file."""
    tensors = load_file(str(folder / name))
    edit(tensors)
    save_file(tensors, str(folder / name))
    if (folder / CONFIG).exists():
        edit_config(folder, lambda m: m["weights"].__setitem__("sha256", sha(folder / name)))


# -- 1. a kill at any rename leaves exactly the old or exactly the new adapters ---------------------------
def _save_killed_after(nm, folder, fmt, k) -> int:
    """Fork a child that saves and `os._exit`s right after its k-th os.replace; the child's exit code
    (17 = killed, 0 = the save finished with fewer than k renames)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            real, calls = os.replace, [0]

            def replace(*args, **kwargs):
                real(*args, **kwargs)
                calls[0] += 1
                if calls[0] == k:
                    os._exit(17)

            os.replace = replace
            neat_fx.save_adapters(nm, folder, format=fmt)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("fmt", ["neat", "peft"])
def test_kill_after_each_rename_leaves_old_or_new_bitwise(nm, tmp_path, fmt):
    snapshot = state(nm)
    try:
        neat_fx.save_adapters(nm, tmp_path / "old", format=fmt)
        old = flat(neat_fx.read_adapters(tmp_path / "old"))
        randomize_adapters(nm, std=0.3, seed=7)
        set_scale(nm, 0.25)  # the new save differs in its config too (PEFT's pair has no checksum to tell)
        neat_fx.save_adapters(nm, tmp_path / "new", format=fmt)
        new = flat(neat_fx.read_adapters(tmp_path / "new"))
        assert not same_tensors(old, new)
        seen = []
        for k in range(1, 20):
            folder = tmp_path / f"k{k}" / "ad"
            shutil.copytree(tmp_path / "old", folder)
            if fmt == "neat":
                (folder / "notes.txt").write_text("mine")  # a user's file: never deleted
            code = _save_killed_after(nm, folder, fmt, k)
            assert code in (0, 17), f"the child failed (exit {code}) at k={k}"
            got = flat(neat_fx.read_adapters(folder))
            outcome = "old" if same_tensors(got, old) else "new" if same_tensors(got, new) else None
            assert outcome is not None, f"a kill after rename {k} left neither the old nor the new adapters"
            seen.append(outcome)
            if fmt == "neat":
                assert (folder / "notes.txt").read_text() == "mine"
            # the next save after the kill works, sweeps what the kill left, and reads back as saved
            neat_fx.save_adapters(nm, folder, format=fmt)
            assert same_tensors(flat(neat_fx.read_adapters(folder)), new)
            names = sorted(p.name for p in folder.iterdir())
            want = [WEIGHTS, CONFIG, "notes.txt"] if fmt == "neat" else [PEFT_CONFIG, PEFT_WEIGHTS]
            assert names == sorted(want), f"after k={k}: {names}"
            assert sorted(p.name for p in folder.parent.iterdir()) == ["ad"], f"after k={k}"
            if code == 0:
                break
        assert seen[0] == "old" and seen[-1] == "new" and len(seen) >= 3, seen
    finally:
        with torch.no_grad():
            nm.load_state_dict(snapshot)
        set_scale(nm, 0.5)


def set_scale(nm, scale):
    nm.neat_config = dataclasses.replace(nm.neat_config, scale=scale)
    for ad in nm.adapters.values():
        ad.scale = scale


def test_stale_temporaries_are_swept_and_user_files_kept(nm, saved, tmp_path):
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    stale = [
        ".neat_config.json.x1y2.tmp",
        ".adapters.safetensors.abcd.tmp",
        "adapters-0123456789ab.safetensors",  # content-addressed weights no config names
        ".adapters-0123456789ab.safetensors.zz.tmp",
    ]
    for name in stale:
        (folder / name).write_bytes(b"half")
    mine = ["notes.txt", ".my_hidden", "adapters-notes.txt", ".other.abc.tmp"]
    for name in mine:
        (folder / name).write_text("mine")
    (tmp_path / ".ad.tmp-q1w2e3r4").mkdir()  # a staged folder of an interrupted PEFT save
    (tmp_path / ".ad.tmp-q1w2e3r4" / PEFT_WEIGHTS).write_bytes(b"half")
    neat_fx.save_adapters(nm, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG, WEIGHTS, *mine])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert all((folder / n).read_text() == "mine" for n in mine)


def test_a_save_after_a_kill_past_the_commit_removes_the_old_weights(nm, saved, tmp_path):
    snapshot = state(nm)
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    try:
        randomize_adapters(nm, std=0.3, seed=7)
        assert _save_killed_after(nm, folder, "neat", 2) == 17  # killed after the config's replace
        assert len(list(folder.glob("adapters-*.safetensors"))) == 1
        randomize_adapters(nm, std=0.3, seed=11)
        neat_fx.save_adapters(nm, folder)
        want = state(nm)
        assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS, CONFIG]
        with torch.no_grad():
            nm.load_state_dict(snapshot)
        neat_fx.load_adapters(nm, folder)
        assert same_tensors(state(nm), want)
    finally:
        with torch.no_grad():
            nm.load_state_dict(snapshot)


def test_peft_save_keeps_the_folder_mode(nm, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    folder.chmod(0o755)
    neat_fx.save_adapters(nm, folder, format="peft")
    assert folder.stat().st_mode & 0o777 == 0o755


def test_peft_save_refuses_a_folder_with_other_files(nm, tmp_path):
    folder = tmp_path / "p"
    neat_fx.save_adapters(nm, folder, format="peft")
    (folder / "README.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"README\.md.*will not delete"):
        neat_fx.save_adapters(nm, folder, format="peft")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_peft_read_falls_back_to_the_previous_copy(nm, tmp_path):
    neat_fx.save_adapters(nm, tmp_path / "p", format="peft")
    want = flat(neat_fx.read_adapters(tmp_path / "p"))
    os.replace(tmp_path / "p", tmp_path / "p.old")  # what a kill between the two renames of the swap leaves
    assert same_tensors(flat(neat_fx.read_adapters(tmp_path / "p")), want)


# -- 2. shapes and dtypes checked before the first write -----------------------------------------------------
def _first_site(folder):
    return json.loads((folder / CONFIG).read_text())["sites"][0]["name"]


@pytest.mark.parametrize(
    "part, value, expected",
    [
        ("neat_encoders.0", torch.ones(1, 4), r"\(4, 4\)"),  # broadcast silently before
        ("neat_encoders.0", torch.ones(5, 5), r"\(4, 4\)"),  # a raw RuntimeError after 14 writes before
        ("neat_decoders.1", torch.ones(4), r"\(4, 4\)"),
        ("neat_A", torch.ones(32, 5), r"\(32, 4\)"),
        ("neat_B", torch.ones(1, 4), r"\(32, 4\)"),
        ("neat_A", torch.ones(32, 4, dtype=torch.float64), "float32"),
        ("neat_encoders.1", torch.ones(4, 4, dtype=torch.int32), "float32"),
    ],
)
def test_wrong_tensor_shape_or_dtype_is_refused_before_any_write(nm, saved, tmp_path, part, value, expected):
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    key = f"{_first_site(folder)}.{part}"
    rewrite_weights(folder, lambda t: t.__setitem__(key, value))
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError) as err:
        neat_fx.load_adapters(nm, folder)
    msg = str(err.value)
    assert WEIGHTS in msg and key in msg
    assert __import__("re").search(expected, msg), msg
    assert unchanged(before, nm)


def test_wrong_trainable_tensor_is_refused(nm, saved, tmp_path):
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    rewrite_weights(folder, lambda t: t.__setitem__("classifier.weight", torch.ones(3, 7)))
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"classifier\.weight.*\(3, 32\)"):
        neat_fx.load_adapters(nm, folder)
    assert unchanged(before, nm)


def test_peft_wrong_encoder_shape_is_refused(nm, tmp_path):
    folder = tmp_path / "p"
    neat_fx.save_adapters(nm, folder, format="peft")
    key = next(k for k in load_file(str(folder / PEFT_WEIGHTS)) if "peanut_encoders.0" in k)
    rewrite_weights(folder, lambda t: t.__setitem__(key, torch.ones(1, 4)), name=PEFT_WEIGHTS)
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"\(4, 4\)") as err:
        neat_fx.load_adapters(nm, folder)
    assert PEFT_WEIGHTS in str(err.value) and key in str(err.value)
    assert unchanged(before, nm)


# -- 4. NaN and inf --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m["config"].__setitem__("scale", float("nan")), "config.scale"),
        (lambda m: m["config"].__setitem__("scale", float("inf")), "config.scale"),
        (lambda m: m["sites"][0].__setitem__("scale", float("nan")), "sites[0].scale"),
    ],
)
def test_non_finite_scale_in_saved_config_is_refused(nm, saved, tmp_path, edit, field):
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    edit_config(folder, edit)
    with pytest.raises(neat_fx.AdapterMismatchError) as err:
        neat_fx.read_adapters(folder)
    assert CONFIG in str(err.value) and field in str(err.value)


def test_non_finite_peft_scaling_is_refused(nm, tmp_path):
    folder = tmp_path / "p"
    neat_fx.save_adapters(nm, folder, format="peft")
    meta = json.loads((folder / PEFT_CONFIG).read_text())
    meta["scaling"] = float("nan")
    (folder / PEFT_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(neat_fx.AdapterMismatchError) as err:
        neat_fx.read_adapters(folder)
    assert PEFT_CONFIG in str(err.value) and "scaling" in str(err.value)


@pytest.mark.parametrize("fmt", ["neat", "peft"])
def test_an_adapter_holding_nan_saves_and_reloads_bitwise(nm, tmp_path, fmt):
    snapshot = state(nm)
    try:
        ad = next(iter(nm.adapters.values()))
        with torch.no_grad():
            ad.encoders[0][0, 0] = float("nan")
            ad.B[1, 2] = float("inf")
        neat_fx.save_adapters(nm, tmp_path / "n", format=fmt)  # no "verification failed"
        want = state(nm)
        with torch.no_grad():
            nm.load_state_dict(snapshot)
        neat_fx.load_adapters(nm, tmp_path / "n")
        got = state(nm)
        assert same_tensors({k: got[k] for k in want}, want)
    finally:
        with torch.no_grad():
            nm.load_state_dict(snapshot)


# -- 6. no file outside the folder -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["absolute", "parent", "subfolder"])
def test_weights_file_outside_the_folder_is_refused(nm, saved, tmp_path, where):
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(saved / WEIGHTS, tmp_path / "elsewhere" / WEIGHTS)  # a valid file with the right checksum
    (folder / "sub").mkdir()
    shutil.copy(saved / WEIGHTS, folder / "sub" / WEIGHTS)
    name = {
        "absolute": str(tmp_path / "elsewhere" / WEIGHTS),
        "parent": f"../elsewhere/{WEIGHTS}",
        "subfolder": f"sub/{WEIGHTS}",
    }[where]
    edit_config(folder, lambda m: m["weights"].__setitem__("file", name))
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError, match=r"weights\.file.*plain file name") as err:
        neat_fx.load_adapters(nm, folder)
    assert CONFIG in str(err.value)
    assert unchanged(before, nm)


# -- 7. malformed input: the library's error, naming the file and the field ------------------------------
def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _truncate_weights(folder):
    _truncate(folder / WEIGHTS)
    edit_config(folder, lambda m: m["weights"].__setitem__("sha256", sha(folder / WEIGHTS)))


def _rename_site(folder):
    edit_config(folder, lambda m: m["sites"][0].__setitem__("name", "renamed.weight"))


NATIVE_CASES = {
    "no sites": (lambda f: edit_config(f, lambda m: m.pop("sites")), CONFIG, "'sites'"),
    "no config": (lambda f: edit_config(f, lambda m: m.pop("config")), CONFIG, "'config'"),
    "no weights": (lambda f: edit_config(f, lambda m: m.pop("weights")), CONFIG, "'weights'"),
    "no weights.sha256": (lambda f: edit_config(f, lambda m: m["weights"].pop("sha256")), CONFIG, "weights.sha256"),
    "no fingerprint": (
        lambda f: edit_config(f, lambda m: m["sites"][0].pop("fingerprint")),
        CONFIG,
        "sites[0].fingerprint",
    ),
    "no layout": (lambda f: edit_config(f, lambda m: m["sites"][0].pop("layout")), CONFIG, "sites[0].layout"),
    "no trainable": (lambda f: edit_config(f, lambda m: m.pop("trainable")), CONFIG, "'trainable'"),
    "string rank": (lambda f: edit_config(f, lambda m: m["config"].__setitem__("rank", "4")), CONFIG, "config.rank"),
    "renamed site": (_rename_site, WEIGHTS, "renamed.weight.neat_A"),
    "string format_version": (
        lambda f: edit_config(f, lambda m: m.__setitem__("format_version", "1")),
        CONFIG,
        "format_version",
    ),
    "truncated JSON": (lambda f: _truncate(f / CONFIG), CONFIG, "not valid JSON"),
    "non-dict JSON": (lambda f: (f / CONFIG).write_text("[1, 2]"), CONFIG, "JSON list"),
    "sites not a list": (lambda f: edit_config(f, lambda m: m.__setitem__("sites", {"a": 1})), CONFIG, "'sites'"),
    "truncated safetensors, matching checksum": (_truncate_weights, WEIGHTS, "safetensors"),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_malformed_native_folder_gives_the_library_error(nm, saved, tmp_path, case):
    corrupt, file, field = NATIVE_CASES[case]
    folder = tmp_path / "ad"
    shutil.copytree(saved, folder)
    corrupt(folder)
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError) as err:
        neat_fx.load_adapters(nm, folder)
    msg = str(err.value)
    assert str(folder / file) in msg and field in msg, msg
    assert "expected" in msg, msg
    assert unchanged(before, nm)


def _peft_edit(key, value=None):
    def edit(folder):
        meta = json.loads((folder / PEFT_CONFIG).read_text())
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
        (folder / PEFT_CONFIG).write_text(json.dumps(meta))

    return edit


PEFT_CASES = {
    "no r": (_peft_edit("r"), PEFT_CONFIG, "'r'"),
    "string r": (_peft_edit("r", "4"), PEFT_CONFIG, "'r'"),
    "string depth": (_peft_edit("depth", "1"), PEFT_CONFIG, "'depth'"),
    "truncated JSON": (lambda f: _truncate(f / PEFT_CONFIG), PEFT_CONFIG, "not valid JSON"),
    "non-dict JSON": (lambda f: (f / PEFT_CONFIG).write_text('"x"'), PEFT_CONFIG, "JSON str"),
    "truncated safetensors": (lambda f: _truncate(f / PEFT_WEIGHTS), PEFT_WEIGHTS, "safetensors"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_malformed_peft_folder_gives_the_library_error(nm, tmp_path, case):
    corrupt, file, field = PEFT_CASES[case]
    folder = tmp_path / "p"
    neat_fx.save_adapters(nm, folder, format="peft")
    corrupt(folder)
    before = state(nm)
    with pytest.raises(neat_fx.AdapterMismatchError) as err:
        neat_fx.load_adapters(nm, folder)
    msg = str(err.value)
    assert str(folder / file) in msg and field in msg, msg
    assert unchanged(before, nm)
