"""Hostile-user probes of the CLI (issue 17): every user error is one stderr line, exit 2, no traceback, and
nothing an error path touches is written or modified. Each test names the defect it guards against."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdexport.checkpoint import load_checkpoint, save_checkpoint
from kdexport.cli import app
from kdexport.sweep import ResultsStore

runner = CliRunner()
PAIR = "lenet5:lenet300_100"


def user_error(args: list[str], match: str) -> str:
    """Run the CLI; assert exit 2 with one stderr line containing `match` and no traceback; return it."""
    res = runner.invoke(app, [str(a) for a in args])
    err = res.stderr.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


# ------------------------------------------------------------------------------------------------ devices
DEVICE_COMMANDS = {
    "train": ["train", "--model", "lenet5", "--epochs", "1"],
    "evaluate": ["evaluate", "missing.pt"],
    "distill": ["distill", "--pair", PAIR, "--teacher", "missing.pt"],
    "prune": ["prune", "missing.pt", "--method", "weight", "--amount", "0.5"],
    "compare": ["compare", "a.pt", "b.pt"],
    "sweep": ["sweep", "--pairs", PAIR, "--out", "study"],
    "compress": ["compress", "--pair", PAIR],
}


@pytest.mark.parametrize("command", DEVICE_COMMANDS)
@pytest.mark.parametrize("device", ["tpu", "", "cpu:1", "cuda:x"])
def test_bad_device_is_one_line_before_any_work(tmp_path, monkeypatch, command, device):
    monkeypatch.chdir(tmp_path)
    user_error([*DEVICE_COMMANDS[command], "--device", device], f"unknown --device {device!r}")
    assert not any(tmp_path.iterdir())  # nothing written, nothing trained


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    user_error(["train", "--model", "lenet5", "--out", tmp_path / "m.pt", "--device", "cuda"], "no CUDA GPU")


# ------------------------------------------------------------------------------------------------ outputs
def test_out_that_is_a_directory_or_under_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    user_error(["train", "--model", "lenet5", "--out", tmp_path, "--device", "cpu"], "is a directory")
    user_error(["train", "--model", "lenet5", "--out", tmp_path / "file" / "m.pt", "--device", "cpu"],
               "is a file, not a directory")
    user_error(["compress", "--pair", PAIR, "--out", tmp_path / "file", "--device", "cpu"], "is a file")
    user_error(["sweep", "--pairs", PAIR, "--out", tmp_path / "file", "--device", "cpu"], "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no log, no state file: no epoch ran


def test_distill_refuses_to_overwrite_its_teacher(teacher_ckpt, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(teacher_ckpt.read_bytes())
    before = teacher.read_bytes()
    user_error(["distill", "--pair", PAIR, "--teacher", teacher, "--out", teacher, "--device", "cpu"],
               "is the input")
    link = tmp_path / "link.pt"
    link.symlink_to(teacher)
    user_error(["distill", "--pair", PAIR, "--teacher", teacher, "--out", link, "--device", "cpu"], "is the input")
    hard = tmp_path / "hard.pt"
    os.link(teacher, hard)  # another name, the same inode
    user_error(["distill", "--pair", PAIR, "--teacher", teacher, "--out", hard, "--device", "cpu"], "is the input")
    assert teacher.read_bytes() == before


# ------------------------------------------------------------------------------------------------ readers
def test_stats_never_writes_to_an_empty_or_foreign_database(tmp_path):
    empty = tmp_path / "e.sqlite"
    empty.touch()
    foreign = tmp_path / "f.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    foreign_bytes = foreign.read_bytes()
    for path in (empty, foreign):
        user_error(["stats", path], "is not a kdexport results store")
        user_error(["report", path, "--out", tmp_path / "r"], "is not a kdexport results store")
    assert empty.stat().st_size == 0 and foreign.read_bytes() == foreign_bytes
    assert not (tmp_path / "r").exists()


@pytest.fixture
def store_dir(tmp_path) -> Path:
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for pair in ("a", "b"):
            for method in ("weight", "channel"):
                for level in (0.0, 0.5):
                    store.write({"pair": pair, "dataset": "digits", "method": method, "level": level, "repeat": 0,
                                 "top1": 90.0 - 10 * level, "params_nonzero": int(1e5 * (1 - level)),
                                 "deployed_params": int(2e5 * (1 - level)), "student_params": int(1e5)})
    return tmp_path


def test_report_and_stats_accept_the_store_directory(store_dir, tmp_path):
    res = runner.invoke(app, ["stats", str(store_dir), "--json"])
    assert res.exit_code == 0, res.output
    assert {e["pair"] for e in json.loads(res.stdout)["pairs"]} == {"a", "b"}
    res = runner.invoke(app, ["report", str(store_dir), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figs" / "index.html").is_file()


def test_readers_open_the_store_read_only(store_dir):
    store = store_dir / "results.sqlite"
    os.chmod(store, 0o444)  # root ignores the mode for writes, but SQLite's mode=ro does not
    with ResultsStore(store, create=False) as s:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            s.db.execute("CREATE TABLE x (a)")


def test_non_utf8_csv_is_one_line(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_bytes("pair,method,accuracy,params\nr\xe9sum\xe9,weight,90,1e6\n".encode("latin-1"))
    user_error(["stats", csv], "is not UTF-8")
    user_error(["report", csv, "--out", tmp_path / "r"], "is not UTF-8")


def test_stats_numbers_rows_one_way(tmp_path):
    """Both checks count data rows from 1: row 2 is the second data row (line 3 of the file)."""
    bad_value = tmp_path / "v.csv"
    bad_value.write_text("pair,method,accuracy,params\na,weight,90,1e6\na,weight,ninety,1e6\n")
    bad_method = tmp_path / "m.csv"
    bad_method.write_text("pair,method,accuracy,params\na,weight,90,1e6\na,wieght,90,1e6\n")
    assert "row 2 (line 3)" in user_error(["stats", bad_value], "bad value")
    assert "row 2:" in user_error(["stats", bad_method], "method must be")


def test_corrupt_onnx_is_one_line(tmp_path):
    for name, data in (("garbage.onnx", b"not a model at all" * 8), ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(data)
        user_error(["profile", tmp_path / name], "is not a readable ONNX model")


# ------------------------------------------------------------------------------------------------ checkpoints
def tiny_checkpoint(path: Path, **spec_changes) -> Path:
    from kdexport import models
    from kdexport.checkpoint import model_spec
    from kdexport.data import dataset_info

    info = dataset_info("digits")
    spec = model_spec("model", num_classes=10, stem="imagenet", input_size=info.input_size, dataset="digits",
                      mean=info.mean, std=info.std, model="lenet5")
    save_checkpoint(path, models.create_model("lenet5").state_dict(), {**spec, **spec_changes})
    return path


@pytest.mark.parametrize("spec_text, match", [
    ("null", "JSON NoneType, not an object"), ('"text"', "JSON str, not an object"), ("3", "JSON int"),
    ("[1, 2]", "JSON list"), ('{"format_version": "1", "kind": "model"}', "format_version '1', not an integer"),
    ('{"format_version": 1, "kind": "model"}', "lacks num_classes"),
])
def test_bad_spec_json_is_one_line(tmp_path, spec_text, match):
    path = tmp_path / "c.pt"
    torch.save({"format": "kdexport", "spec": spec_text, "state_dict": {}}, path)
    user_error(["evaluate", path, "--device", "cpu"], match)


def test_unknown_model_in_a_spec_says_so(tmp_path):
    path = tiny_checkpoint(tmp_path / "c.pt")
    state, spec = load_checkpoint(path)
    torch.save({"format": "kdexport", "spec": json.dumps({**spec, "model": "resnet9000"}), "state_dict": state},
               path)
    user_error(["evaluate", path, "--device", "cpu"], "names model 'resnet9000', which is not registered")


def test_pickles_and_directories_get_their_own_message(tmp_path):
    import pickle

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    user_error(["evaluate", plain, "--device", "cpu"], "holds pickled objects")
    user_error(["evaluate", tmp_path, "--device", "cpu"], "is a directory; pass a checkpoint file")


def test_nan_weights_warn_on_evaluate_and_stop_an_export(tmp_path):
    path = tiny_checkpoint(tmp_path / "nan.pt")
    state, spec = load_checkpoint(path)
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(path, state, spec)
    res = runner.invoke(app, ["evaluate", str(path), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert "holds NaN or inf in 1 tensor(s) (first: features.0.weight)" in res.stderr
    user_error(["export", path, "--out", tmp_path / "nan.onnx"], "holds NaN or inf")
    assert not (tmp_path / "nan.onnx").exists()


def test_zero_epochs_says_it_writes_the_untrained_model(tmp_path):
    res = runner.invoke(app, ["train", "--model", "lenet5", "--epochs", "0", "--out", str(tmp_path / "m.pt"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "--epochs 0: writing the untrained model" in res.stderr


def test_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o002)
    try:
        res = runner.invoke(app, ["train", "--model", "lenet5", "--epochs", "0", "--out", str(tmp_path / "m.pt"),
                                  "--device", "cpu"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o664
