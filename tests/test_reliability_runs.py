"""Reliability of real CLI processes (issue 17): SIGKILL then a plain rerun continues (train, distill, compress,
sweep) and ends where an uninterrupted run does; one writer per output; stale locks are taken over; a read-only
directory refused for a user without root's override; user errors in a real process print no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from kdexport.checkpoint import load_checkpoint
from kdexport.lock import OutputBusy, lock_file, output_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
PAIR = "lenet5:lenet300_100"
TRAIN = ["--model", "lenet5", "--epochs", "2", "--recipe", "simkd", "--lr", "0.02", "--batch-size", "32",
         "--device", "cpu"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdexport.cli", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdexport.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def logged_epochs(log: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.is_file() else []


def kill_after_first_epoch(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` once the state file beside `log` exists (it is renamed into place after each epoch)."""
    state = log.with_name(log.name.removesuffix(".log.jsonl") + ".state.pt")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkilled_train_continues_on_a_plain_rerun_and_ends_like_an_uninterrupted_one(tmp_path):
    """Also: a rerun with other settings refuses to continue it, naming the fields that differ."""
    whole = start("train", *TRAIN, "--out", tmp_path / "whole.pt")  # the reference, alongside
    out, log = tmp_path / "m.pt", tmp_path / "m.log.jsonl"
    kill_after_first_epoch(start("train", *TRAIN, "--out", out), log)
    assert not out.exists() and (tmp_path / "m.state.pt").is_file()
    assert logged_epochs(log) == [1]
    changed = cli("train", *TRAIN, "--out", out, "--epochs", "3", "--lr", "0.01")  # other settings: refused
    assert changed.returncode == 2, changed.stderr
    assert "other settings (epochs, recipe.lr)" in changed.stderr and "Traceback" not in changed.stderr
    rerun = cli("train", *TRAIN, "--out", out)  # the same command, no flag
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the interrupted run of m.pt at epoch 2/2" in rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert logged_epochs(log) == [1, 2]  # the killed run's epoch is kept, none repeated
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()
    a, b = load_checkpoint(tmp_path / "whole.pt")[0], load_checkpoint(out)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "m.state.pt").exists() and not lock_file(out).exists()


def test_sigkilled_distill_continues_on_a_plain_rerun(teacher_ckpt, tmp_path):
    args = ["distill", "--pair", PAIR, "--teacher", teacher_ckpt, "--epochs", "2", "--batch-size", "16",
            "--device", "cpu", "--out", tmp_path / "s.pt"]
    kill_after_first_epoch(start(*args), tmp_path / "s.log.jsonl")
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the interrupted run of s.pt at epoch 2/2" in rerun.stderr
    assert logged_epochs(tmp_path / "s.log.jsonl") == [1, 2]


@pytest.mark.parametrize("command", ["compress", "sweep"])
def test_sigkilled_in_the_teacher_stage_a_plain_rerun_continues(tmp_path, command):
    out = tmp_path / "run"
    common = ["--levels", "0", "--methods", "weight", "--teacher-epochs", "3", "--distill-epochs", "1",
              "--device", "cpu", "--out", out]
    args = [command, "--pair", PAIR, "--no-baseline", *common] if command == "compress" else \
        [command, "--pairs", PAIR, "--repeats", "1", *common]
    run_dir = out if command == "compress" else out / "digits" / "lenet5-lenet300_100"
    kill_after_first_epoch(start(*args), run_dir / "teacher.log.jsonl")
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "continuing the interrupted run of teacher.pt" in rerun.stderr
    assert logged_epochs(run_dir / "teacher.log.jsonl") == [1, 2, 3]
    assert (run_dir / "student.pt").is_file()


# ------------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out, log = tmp_path / "m.pt", tmp_path / "m.log.jsonl"
    first = start("train", *TRAIN, "--epochs", "50", "--out", out)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not lock_file(out).is_file():
        time.sleep(0.02)
    second = cli("train", *TRAIN, "--epochs", "50", "--out", out)
    assert second.returncode == 2, second.stderr
    assert first.poll() is None, "the first writer must still be running for this probe"
    assert f"being written by pid {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    first.kill()
    first.wait()
    epochs = logged_epochs(log)
    assert epochs == list(range(1, len(epochs) + 1))  # one run's log, not two interleaved


def test_two_sweeps_on_one_store_one_is_refused(tmp_path):
    args = ["sweep", "--pairs", PAIR, "--levels", "0", "--methods", "weight", "--repeats", "1", "--teacher-epochs",
            "50", "--distill-epochs", "1", "--device", "cpu", "--out", tmp_path]
    first = start(*args)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not lock_file(tmp_path / "results.sqlite").is_file():
        time.sleep(0.02)
    second = cli(*args)
    assert second.returncode == 2 and f"being written by pid {first.pid}" in second.stderr, second.stderr
    assert first.poll() is None, "the first sweep must still be running for this probe"
    first.kill()
    first.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    target = tmp_path / "m.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdexport.lock import output_lock\n"
                               f"with output_lock({str(target)!r}):\n print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputBusy, match=f"pid {holder.pid} on "):
        with output_lock(target):
            pass
    holder.kill()
    holder.wait()
    assert lock_file(target).is_file()  # left behind by the dead holder
    with output_lock(target):
        assert lock_file(target).read_text().startswith(f"pid {os.getpid()} ")
    assert not lock_file(target).exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with output_lock(tmp_path, directory=True), output_lock(tmp_path, directory=True):
        assert lock_file(tmp_path, directory=True).is_file()
    assert not lock_file(tmp_path, directory=True).exists()


# ------------------------------------------------------------------------------------------------ permissions
NOBODY = 65534


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges in a child")
def test_read_only_directory_refused_for_a_user_without_override():
    """Root writes anywhere (CAP_DAC_OVERRIDE), so the probe runs in a forked child that became `nobody`."""
    from typer.testing import CliRunner

    from kdexport.cli import app

    base = Path(tempfile.mkdtemp(prefix="kdexport-ro-"))
    try:
        ro = base / "ro"
        ro.mkdir()
        os.chmod(base, 0o755)
        os.chmod(ro, 0o555)
        # the same path once as root, so that nothing is imported after the switch (/root is not nobody's)
        warm = CliRunner().invoke(app, ["train", "--model", "lenet5", "--device", "cpu", "--out", str(base)])
        assert warm.exit_code == 2, warm.output
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                if os.geteuid() == 0:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                res = CliRunner().invoke(app, ["train", "--model", "lenet5", "--epochs", "1", "--device", "cpu",
                                               "--out", str(ro / "m.pt")])
                os.write(write, json.dumps([res.exit_code, res.stderr, res.output + repr(res.exception)]).encode())
                code = 0
            except PermissionError:
                code = 4  # no CAP_SETUID here
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 4:
            pytest.skip("cannot switch to an unprivileged user here")
        exit_code, stderr, output = json.loads(text)
        assert exit_code == 2, output
        assert "cannot write in" in stderr and "Traceback" not in output
        assert not any(ro.iterdir())
    finally:
        os.chmod(base / "ro", 0o755)
        for p in sorted(base.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


# ------------------------------------------------------------------------------------------------ real processes
def test_user_errors_in_a_real_process_print_one_line_and_no_traceback(tmp_path):
    """What CliRunner cannot see: warnings and tracebacks printed by the interpreter itself."""
    import pickle

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    (tmp_path / "bad.onnx").write_bytes(b"\x00junk" * 10)  # protobuf's DecodeError
    probes = [["evaluate", plain], ["profile", tmp_path / "bad.onnx"]]
    for args in probes:
        res = cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
