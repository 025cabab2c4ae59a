"""Runs left alone overnight (issue 22): resume checks its data, outputs are never overwritten
and never shared, a bad or vanishing file costs one line, a NaN validation loss stops the run,
one-class pretraining ends cleanly. Numbered as in the issue; each test failed on the old code."""
import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import uproot

import common
import finetune
import jetclr
from scripts import study
from test_data import random_jets, write_jetclass

CPU = torch.device("cpu")
JETCLR = ["--epochs", "1", "--batch-size", "16", "--dim", "16", "--depth", "1", "--heads", "2",
          "--n-eval", "16", "--n-max", "32", "--device", "cpu", "--no-compile",
          "--log-every", "50"]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))


def folder(root, n=24, classes=(("TTBar", "Tbqq"), ("ZJetsToNuNu", "QCD")), splits=("train",)):
    for split in splits:
        for k, (prefix, label) in enumerate(classes):
            write_jetclass(root / split / f"{prefix}_000.root", random_jets(n, k), label)
    return root


def corrupt(path):
    """Garble the middle of part_px's first basket: the file opens and counts its entries, and
    the read of its jets fails (a bad copy, a failing disk)."""
    branch = uproot.open(path)["tree"]["part_px"]
    seek, size = int(branch.member("fBasketSeek")[0]), int(branch.member("fBasketBytes")[0])
    data = bytearray(path.read_bytes())
    data[seek + size // 2:seek + size // 2 + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    return path


# --- 1. resume refuses other data, workers or shuffle buffer ----------------------------------

def test_resume_checks_data_identity_workers_and_shuffle_buffer(tmp_path):
    d = folder(tmp_path / "a")
    args = dict(data="pythia", data_dir=str(d), batch_size=8, n_max=32, features="kin", workers=2,
                shuffle_buffer=1000, n_jets=None, seed=0, classes=None)
    stream = common.JetStream("pythia", path=d, batch_size=8)
    model = nn.Linear(2, 1)
    ckpt = tmp_path / "m.pt"
    common.save_checkpoint(ckpt, method="toy", args=args, model=model, step=3,
                           data=stream.identity)
    assert common.resume_from(ckpt, model, args=args, data=stream.identity) == 3
    # other files under another folder: 12 jets per file instead of 24
    other = folder(tmp_path / "b", n=12)
    now = common.JetStream("pythia", path=other, batch_size=8).identity
    with pytest.raises(SystemExit, match=r"--data-dir: checkpoint .*/a' \(2 files\), now .*/b'"
                                         r" \(2 files\); .*TTBar_000.root") as e:
        common.resume_from(ckpt, model, args=dict(args, data_dir=str(other)), data=now)
    assert "\n" not in str(e.value)
    # the same files, moved: resumes with a warning
    moved = tmp_path / "moved"
    shutil.copytree(d, moved)
    same = common.JetStream("pythia", path=moved, batch_size=8).identity
    with pytest.warns(UserWarning, match=r"--data-dir .*moved: the checkpoint read .*/a; the 2 "
                                         r"files are the same"):
        assert common.resume_from(ckpt, model, args=dict(args, data_dir=str(moved)),
                                  data=same) == 3
    for flag, value, shown in (("workers", 0, "--workers: checkpoint 2, now 0"),
                               ("shuffle_buffer", 50, "--shuffle-buffer: checkpoint 1000, "
                                                      "now 50")):
        with pytest.raises(SystemExit, match=shown):
            common.resume_from(ckpt, model, args=dict(args, **{flag: value}), data=stream.identity)


def test_method_resume_with_other_workers_stops(tiny_pythia, tmp_path):
    argv = JETCLR + ["--data-dir", str(tiny_pythia), "--out", str(tmp_path), "--steps", "2"]
    jetclr.train(jetclr.get_args(argv))
    with pytest.raises(SystemExit, match="--workers: checkpoint 0, now 2"):
        jetclr.train(jetclr.get_args(argv + ["--resume", str(tmp_path / "jetclr.pt"),
                                             "--workers", "2"]))


# --- 2. outputs: never replaced, never shared, writable at start ------------------------------

def test_new_run_refuses_another_runs_checkpoint(tiny_pythia, tmp_path):
    ckpt = tmp_path / "jetclr.pt"
    ckpt.write_bytes(b"a finished 60-step run")
    argv = JETCLR + ["--data-dir", str(tiny_pythia), "--out", str(tmp_path), "--steps", "1"]
    with pytest.raises(SystemExit, match=rf"{ckpt} holds another run's output: continue it with "
                                         rf"--resume {ckpt}, replace it with --overwrite") as e:
        jetclr.train(jetclr.get_args(argv))
    assert "\n" not in str(e.value) and ckpt.read_bytes() == b"a finished 60-step run"
    assert not (tmp_path / "jetclr.jsonl").exists()
    common.claim_output(ckpt, argparse.Namespace(resume=str(ckpt), overwrite=False))
    common.claim_output(ckpt, argparse.Namespace(resume=None, overwrite=True))


def _hold(path, ready, done):
    common.lock_output(path)
    ready.set()
    done.wait(60)


def test_second_run_on_one_checkpoint_names_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "jetclr.pt", ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(SystemExit, match=rf"jetclr.pt: another run \(pid {holder.pid}\) is "
                                             "writing it"):
            common.claim_output(tmp_path / "jetclr.pt", argparse.Namespace(resume=None))
        # scripts/study.py takes the same lock on its --out, before any cell is touched
        holder2 = ctx.Process(target=_hold, args=(tmp_path / "s" / "study.json", ready, done))
        ready.clear()
        holder2.start()
        assert ready.wait(30)
        with pytest.raises(SystemExit, match=rf"study.json: another run \(pid {holder2.pid}\)"):
            study.main(study.get_args(["--methods", "jetclr", "--out", str(tmp_path / "s")]))
    finally:
        done.set()
        holder.join(30)
    holder2.join(30)
    common.claim_output(tmp_path / "jetclr.pt", argparse.Namespace(resume=None))  # released


def test_unwritable_out_is_found_at_start(tiny_pythia, tmp_path):
    (tmp_path / "file").write_text("")       # root ignores permissions: a file as the parent
    argv = JETCLR + ["--data-dir", str(tiny_pythia), "--out", str(tmp_path / "file" / "out")]
    with pytest.raises(SystemExit, match=r"--out .*file/out: not writable \(.*\); give a folder "
                                         "you can write to"):
        jetclr.train(jetclr.get_args(argv))


def test_finetune_refuses_a_finished_results_folder(tiny_pythia, tmp_path):
    argv = ["--scratch", "--size", "small", "--data-dir", tiny_pythia, "--out", tmp_path,
            "--name", "run", "--n-max", "16", "--steps", "1", "--batch-size", "16",
            "--device", "cpu", "--n-eval", "16"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="run/results.json holds another run's output: replace "
                                         "it with --overwrite"):
        finetune.main(finetune.get_args([str(a) for a in argv]))
    assert (tmp_path / "run" / "results.json").read_text() == "{}"


# --- 3. bad and vanishing files ---------------------------------------------------------------

def test_worker_read_error_is_one_line(tmp_path):
    """Run in a fresh interpreter: the worker's traceback would go to the process's stderr."""
    d = folder(tmp_path / "d", n=40)
    corrupt(d / "train" / "TTBar_000.root")
    code = ("import sys, torch, common\n"
            f"s = common.JetStream('pythia', path={str(d)!r}, batch_size=8, workers=2)\n"
            "for b in common.loader(s, torch.device('cpu')): pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "TTBar_000.root: cannot read entries" in lines[0] and "truncated or corrupt" in lines[0]


def test_broken_val_file_stops_before_training(tmp_path):
    d = folder(tmp_path / "d", splits=("train", "val"))
    corrupt(d / "val" / "ZJetsToNuNu_000.root")
    common.JetStream("pythia", "train", path=d, batch_size=8)  # the training split reads later
    with pytest.raises(SystemExit, match=r"val/ZJetsToNuNu_000.root: cannot read entries"):
        common.JetStream("pythia", "val", path=d, batch_size=8, shuffle=False, drop_last=False)


def test_file_deleted_mid_run_is_one_line(tmp_path):
    d = folder(tmp_path / "d")
    stream = common.JetStream("pythia", path=d, batch_size=8)
    (d / "train" / "TTBar_000.root").unlink()
    with pytest.raises(SystemExit, match=r"TTBar_000.root: cannot be read any more \(No such "
                                         r"file or directory\); the file was moved or deleted"):
        list(common.loader(stream, CPU))


# --- 4. a non-finite validation loss stops the run --------------------------------------------

def test_nan_val_loss_stops_without_a_checkpoint(tiny_pythia, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"validation loss nan on pythia val"):
        common.check_val_loss(torch.tensor(float("nan")), "pythia val")
    assert common.check_val_loss(np.float64(0.5), "x") == 0.5
    nt_xent = jetclr.nt_xent

    def nan_in_eval(z, *a, **kw):  # training stays finite; the evaluation (no grad) is NaN
        loss = nt_xent(z, *a, **kw)
        return loss if torch.is_grad_enabled() else loss * float("nan")
    monkeypatch.setattr(jetclr, "nt_xent", nan_in_eval)
    argv = JETCLR + ["--data-dir", str(tiny_pythia), "--out", str(tmp_path), "--steps", "2"]
    with pytest.raises(SystemExit) as e:
        jetclr.train(jetclr.get_args(argv))
    assert e.value.code not in (None, 0) and "validation loss nan" in str(e.value)
    assert not (tmp_path / "jetclr.pt").exists()


# --- 5. one-class pretraining ends without the probe ------------------------------------------

def test_one_class_pretraining_skips_the_probe(tmp_path, capsys):
    d = folder(tmp_path / "qcd", n=40, classes=(("ZJetsToNuNu", "QCD"),), splits=("train", "val"))
    argv = JETCLR + ["--data", "jetclass", "--data-dir", str(d), "--out", str(tmp_path / "o"),
                     "--steps", "2"]
    jetclr.train(jetclr.get_args(argv))
    out = capsys.readouterr().out
    assert "linear probe skipped: the training jets hold one class (QCD)" in out
    assert (tmp_path / "o" / "jetclr.pt").exists()


# --- 8. finetune.py: the advice for a missing class, the folder's name -------------------------

def test_finetune_missing_class_advice_and_folder_name(tiny_pythia10, tiny_pythia, tmp_path):
    base = ["--scratch", "--size", "small", "--out", tmp_path, "--n-max", "16", "--steps", "1",
            "--batch-size", "16", "--device", "cpu", "--n-eval", "16"]
    argv = base + ["--data-dir", tiny_pythia10, "--n-jets", "5", "--n-labels", "5"]
    with pytest.raises(SystemExit, match=r"hold no .* jet: raise --n-jets \(now 5"):
        finetune.main(finetune.get_args([str(a) for a in argv]))
    argv = base + ["--data-dir", tiny_pythia, "--n-labels", "100000", "--mode", "probe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = finetune.main(finetune.get_args([str(a) for a in argv]))
    assert res["name"].endswith(f"_n{res['n_labels']}") and res["n_labels"] < 100000
