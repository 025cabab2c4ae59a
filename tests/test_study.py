"""scripts/study.py: the measures (mean +- std, paired t, Holm), resume without redoing a finished
cell, a failing cell's one-line error, cells side by side (--jobs), and a tiny real study end to
end.

Most tests replace study.launch by a fake program that writes what the scripts write (a
checkpoint, finetune.py's results.json with history, steps_to_converge and test_repr.npz) in
milliseconds; the last test runs the real scripts in-process."""
import json
import math
import os
import sys
import threading
import time

import numpy as np
import pytest
import scipy.stats
import torch

from scripts import study

TINY_MODELS = ['jetclr=--dim 16 --depth 1 --cls-depth 1 --heads 2',
               'mpm=--k 16 --dim 16 --depth 1 --heads 2 --dec-dim 16 --dec-depth 1 --dec-heads 2']


# --- the measures --------------------------------------------------------------------------------


def test_aggregate():
    s = study.aggregate([0.8, 0.9, 1.0])
    assert (s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
            and s["n"] == 3)  # ddof=1
    one = study.aggregate([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"]) and one["n"] == 1
    inf = study.aggregate([2.0, math.inf])
    assert inf["mean"] == math.inf and math.isnan(inf["std"])
    assert study.aggregate([None, 3.0, None])["n"] == 1  # a seed without history is left out
    assert study.aggregate([None, None])["n"] == 0


def test_paired_statistics_match_scipy():
    a = [0.912, 0.931, 0.905, 0.944, 0.921]
    b = [0.901, 0.902, 0.911, 0.921, 0.903]
    d = study.paired(dict(enumerate(a)), dict(enumerate(b)))
    ref = scipy.stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert d["n"] == 5 and d["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert d["p"] == pytest.approx(ref.pvalue) and 0.01 < d["p"] < 0.2
    assert (d["lo"], d["hi"]) == pytest.approx((ci.low, ci.high))
    assert scipy.stats.t.ppf(0.975, 4) == pytest.approx(2.776, abs=1e-3)   # the printed tables
    # pairs by seed: a seed missing, None or infinite in either arm is left out
    more = study.paired({**dict(enumerate(a)), 7: 0.99, 8: math.inf, 9: None},
                        {**dict(enumerate(b)), 8: 0.9, 9: 0.9})
    assert more == d
    one = study.paired({0: 0.9}, {0: 0.8})
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["p"]) and math.isnan(one["lo"])
    assert math.isnan(study.paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})["p"])  # no spread


def test_pair_two_cells(tmp_path, capsys):
    """scripts.pair: the paired gain of two finetune.py outputs, seed by seed, refusing cells
    whose seeds drew other jets."""
    from scripts import pair
    a = [0.912, 0.931, 0.905, 0.944, 0.921]
    b = [0.901, 0.902, 0.911, 0.921, 0.903]

    def cell(name, aucs, seeds, **args):
        d = tmp_path / name
        d.mkdir()
        base = dict(data="pythia", data_dir="d", task="supervised", n_labels=100, label_frac=1.0,
                    n_val=2000, n_eval=10000, backbone_lr_scale=1.0)
        per_seed = [dict(auc=x, acc=x, rej50=10 * x, rej30=math.inf, sic=x) for x in aucs]
        (d / "results.json").write_text(json.dumps(dict(
            name=name, n_labels=100, seeds=seeds, per_seed=per_seed, args={**base, **args})))
        return str(d)

    pre = cell("pre", a + [0.99], [10, 11, 12, 13, 14, 15], backbone_lr_scale=0.1)
    assert pair.main([pre, cell("scr", b, [10, 11, 12, 13, 14])]) == 0
    out = capsys.readouterr().out
    ref = scipy.stats.ttest_rel(a, b)
    lo, hi = ref.confidence_interval(0.95)
    assert "seeds 10-14 (5)" in out and "backbone_lr_scale 0.1 / 1.0" in out
    assert f"auc   {np.mean(np.subtract(a, b)):+.4f} [{lo:+.4f}, {hi:+.4f}] p {ref.pvalue:.2g}" in out
    with pytest.raises(SystemExit, match="differ in --n-labels"):
        pair.main([pre, cell("other", b, [10, 11, 12, 13, 14], n_labels=1000)])
    with pytest.raises(SystemExit, match="share no seed"):
        pair.main([pre, cell("far", b, [0, 1, 2, 3, 4])])
    with pytest.raises(SystemExit, match="nope/results.json not found"):
        pair.main([pre, str(tmp_path / "nope")])


def test_ssl_flattening(tmp_path):
    log = tmp_path / "mpm.jsonl"
    lines = [dict(step=s, val=dict(loss=v)) for s, v in ((25, 3.0), (50, 2.2), (75, 2.02),
                                                          (100, 2.0))]
    log.write_text("\n".join(json.dumps(x) for x in [dict(config=1)] + lines) + "\n")
    curve = study.ssl_curve(log)
    assert curve == [(25, 3.0), (50, 2.2), (75, 2.02), (100, 2.0)]
    assert study.flattening(curve) == pytest.approx(0.01)          # (2.02 - 2.0) / 2.0
    log.write_text(json.dumps(dict(step=8, val_loss=1.5)) + "\n")  # jetclr's, jjepa's key
    assert study.ssl_curve(log) == [(8, 1.5)]
    assert math.isnan(study.flattening([(10, 1.0)]))


def test_holm():
    adjusted = study.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 3p, max(2p, 3p'), 1p -> 0.06, 4p
    with_nan = study.holm([0.01, math.nan, 0.04])
    assert with_nan[0] == pytest.approx(0.02) and math.isnan(with_nan[1])
    assert with_nan[2] == pytest.approx(0.04)
    assert study.holm([0.5, 0.6]) == [1.0, 1.0]


def test_grid_variants():
    v = study.grid_variants("diffmae", study.DEFAULT_SWEEPS["diffmae"])
    settings = [(x["setting"]["mask-ratio"], x["setting"]["pred-ratio"]) for x in v]
    # pred > mask skipped
    assert ("0.125", "0.25") not in settings and ("0.25", "0.25") in settings
    assert len(v) == 4 + (0 + 1 + 2 + 3 + 4 - 0)  # 1tok for each mask, then pred <= mask
    assert v[0]["flags"] == ["--mask-ratio", "0.125", "--pred-ratio", "1tok"]
    with pytest.raises(SystemExit):
        study.grid_variants("jetclr", ["temperature"])


# --- the study on a fake program: resume, report -------------------------------------------------


def fake_launch(calls, fail_at=None):
    """A stand-in for study.launch: writes a method script's checkpoint, or finetune.py's
    results.json (pretrained jetclr: clearly better than scratch; mpm: the same up to a little
    noise) with history and test_repr.npz. fail_at=k: the k-th call leaves a partial folder and
    fails."""

    def launch(cmd, log_path, in_process=False, env=None):
        calls.append(cmd)
        log_path.write_text("fake\n")
        if fail_at is not None and len(calls) == fail_at:
            (log_path.parent / "partial").write_text("x")
            return False
        argv = dict(zip(cmd[1::], cmd[2::]))
        script = cmd[0].rsplit("/", 1)[-1][:-3]
        if script != "finetune":
            torch.save(dict(method=script, encoder_config=dict(dim=8)),
                       f"{argv['--out']}/{script}.pt")
            return True
        out = log_path.parent
        ckpt, seeds, seed0 = argv["--ckpt"], int(argv["--seeds"]), int(argv["--seed"])
        gain = 0.0 if "--scratch" in cmd or "mpm" in ckpt else 0.1
        noise = [0.0 if "--scratch" in cmd else 0.0002 * (7 * k % 3) for k in range(seeds)]
        per_seed = [dict(acc=0.7 + gain + 0.001 * k, auc=0.8 + gain + 0.001 * k + noise[k],
                         rej50=10 + 100 * gain + k, rej30=30 + 100 * gain + k, sic=2 + gain)
                    for k in range(seeds)]
        history = [[dict(epoch=e + 1, step=e + 1, val_auc=a)
                    for e, a in enumerate([0.5, 0.7, 0.69])] for _ in range(seeds)]
        n_train = int(argv.get("--n-labels", 1000))
        results = dict(per_seed=per_seed, history=history, n_train=n_train, n_test=50,
                       steps_to_converge=[2] * seeds, converged=[True] * seeds,
                       classes=["QCD", "top"], seeds=list(range(seed0, seed0 + seeds)))
        (out / "results.json").write_text(json.dumps(results))
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 40)
        np.savez(out / "test_repr.npz", z=rng.normal(size=(40, 4)) + 3 * y[:, None], y=y)
        return True

    return launch


def fake_args(out, *extra):
    return study.get_args(["--methods", "jetclr,mpm", "--pretrain-data", "pythia",
                           "--finetune-data", "pythia", "--pretrain-jets", "100,200",
                           "--labels", "10,all",
                           "--seeds", "3", "--cheap-seeds", "3", "--steps", "2",
                           "--device", "cpu", "--out", str(out), "--tsne-jets", "30", *extra])


def test_study_report_on_fake_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "launch", fake_launch(calls))
    res = study.main(fake_args(tmp_path))
    # 2 methods x 2 sizes pretrainings; (2 scratch + 4 pretrained) x 2 label counts fine-tunings,
    # and as many linear probes
    assert len(calls) == 4 + 12 + 12
    assert len(res["rows"]) == 12 and {r["labels"] for r in res["rows"]} == {10, "all"}
    saved = json.loads((tmp_path / "study.json").read_text())
    assert len(saved["rows"]) == 12
    row = next(r for r in saved["rows"]
               if r["model"] == "jetclr" and r["pretrain_jets"] == 200 and r["labels"] == 10)
    assert row["stats"]["acc"]["mean"] == pytest.approx(0.801)
    assert row["stats"]["steps"]["mean"] == 2
    assert row["stats"]["val_auc"]["mean"] == pytest.approx(0.7)  # at step 2, not the last
    gain = row["vs_scratch"]["auc"]
    assert gain["mean"] == pytest.approx(0.1002) and gain["p"] < 1e-4 and row["holm_p"] < 0.05
    assert row["probe"]["mean"] == pytest.approx(0.1002)         # the probes' fake numbers
    for r in saved["rows"]:
        if r["model"] == "mpm":
            assert (r["vs_scratch"]["auc"]["p"] > 0.05
                    and r["holm_p"] >= r["vs_scratch"]["auc"]["p"])
    md = (tmp_path / "study.md").read_text()
    assert md.count("| model | pretraining jets |") == 4 and "Holm" in md
    table = md.split("## 10 labels")[1].split("##")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "model" not in ln]
    # scratch first
    assert lines[0].startswith("| scratch_jetclr") and lines[1].startswith("| scratch_mpm")
    assert "0.8010 ± 0.0010" in table and " 3/3 |" in table
    assert "+0.1002 [" in table and table.count("▲") == 2 and "▼" not in table
    assert "- undecided: mpm n=100 at 10 labels; mpm n=200 at 10 labels;" in md
    for png in ("labels.png", "gain.png", "pretrain_size.png", "tsne.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # the cells run the scripts with the study's flags; pass-through flags come last
    pre = next(c for c in calls if c[0].endswith("mpm.py"))
    assert pre[pre.index("--n-jets") + 1] == "100" and pre[pre.index("--steps") + 1] == "2"
    ft = next(c for c in calls if c[0].endswith("finetune.py") and "--n-labels" not in c)
    assert "--scratch" in ft and ft[ft.index("--mode") + 1] == "finetune"
    assert ft[ft.index("--n-val") + 1] == "2000"
    probe = next(c for c in calls if "probe_scratch_jetclr_L10" in c)
    assert probe[-2:] == ["--head", "linear"] and probe[probe.index("--mode") + 1] == "probe"
    assert "--scratch" in probe                                      # random weights, frozen
    # 10 seeds where labels are cheap, --seeds elsewhere; J-JEPA pretrains in the context frame
    args = study.get_args(["--labels", "100,1000,10000", "--seeds", "5"])
    assert [study.seeds_at(args, n) for n in args.label_counts] == [10, 10, 5]
    jj = study.pretrain_argv(args, dict(name="jjepa", method="jjepa", flags=[]), 100)
    assert jj[jj.index("--context-frame") + 1] == "context" and "--features" not in jj
    dm = study.pretrain_argv(args, dict(name="diffmae", method="diffmae", flags=[]), 100)
    assert dm[dm.index("--features") + 1] == "kin"                 # Top Tagging lacks the rest


def test_backbone_lr_scale_per_method(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "launch", fake_launch(calls))
    study.main(fake_args(tmp_path, "--backbone-lr-scale", "jetclr=0.5", "--no-probe"))
    tuned = [c for c in calls if c[0].endswith("finetune.py")]
    for c in tuned:  # both arms of jetclr's architecture get it, mpm's keep finetune.py's
        scale = c[c.index("--backbone-lr-scale") + 1] if "--backbone-lr-scale" in c else None
        assert scale == ("0.5" if "jetclr" in c[c.index("--name") + 1] else None), c
    assert sum("--backbone-lr-scale" in c for c in tuned) == 6  # (scratch + 2 sizes) x 2 labels
    assert "backbone lr scale jetclr=0.5" in (tmp_path / "study.md").read_text()
    one = study.get_args(["--backbone-lr-scale", "0.1"])
    argv = study.finetune_argv(one, "x", "c.pt", 100, True, method="mpm")  # one for all
    assert argv[argv.index("--backbone-lr-scale") + 1] == "0.1"
    # per label count: the most specific setting applies
    per = study.get_args(["--backbone-lr-scale", "0.5,mpm=0.1,mpm@100=1,diffmae@all=0.2"])
    scale = lambda m, n: (lambda a: a[a.index("--backbone-lr-scale") + 1])(
        study.finetune_argv(per, "x", "c.pt", n, False, method=m))
    assert [scale("mpm", 100), scale("mpm", 1000), scale("jetclr", 100)] == ["1.0", "0.1", "0.5"]
    assert [scale("diffmae", "all"), scale("diffmae", 100)] == ["0.2", "0.5"]
    for bad in ("jetclr=2", "foo=0.1", "0.1,x", "mpm@x=0.1", "mpm@0=0.1", "@100=0.1"):
        with pytest.raises(SystemExit):
            study.get_args(["--backbone-lr-scale", bad])


def test_finetune_seed_moves_only_the_finetuning(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "launch", fake_launch(calls))
    study.main(fake_args(tmp_path, "--finetune-seed", "10", "--no-probe"))
    seed = lambda c: c[c.index("--seed") + 1]
    assert {seed(c) for c in calls if c[0].endswith("finetune.py")} == {"10"}
    assert {seed(c) for c in calls if not c[0].endswith("finetune.py")} == {"0"}
    header = (tmp_path / "study.md").read_text()
    assert "seeds: 3 at 10 labels (10-12), 3 at all labels (10-12)." in header
    default = study.get_args(["--seed", "3"])  # without it, --seed seeds both
    argv = study.finetune_argv(default, "x", "c.pt", 100, True, method="mpm")
    assert argv[argv.index("--seed") + 1] == "3"


def test_interrupted_study_resumes(tmp_path, monkeypatch):
    calls = []
    # the 3rd fine-tuning fails
    monkeypatch.setattr(study, "launch", fake_launch(calls, fail_at=7))
    with pytest.raises(SystemExit, match=r"cell finetune/\S+ failed; see .*log\.txt"):
        study.main(fake_args(tmp_path))
    failed = calls[6]
    partial = next((tmp_path / "finetune" / ".tmp").iterdir())
    assert (partial / "partial").exists() and not (tmp_path / "study.json").exists()
    done = sorted(p for p in (tmp_path / "finetune").iterdir() if p.name != ".tmp")
    assert len(done) == 2
    mtimes = {p: (p / "results.json").stat().st_mtime_ns for p in done}
    # the rerun: the 4 pretrainings and 2 fine-tunings are skipped; the failed cell is redone
    # from a clean folder, then the rest
    calls2 = []
    monkeypatch.setattr(study, "launch", fake_launch(calls2))
    study.main(fake_args(tmp_path))
    assert len(calls2) == 28 - 6 and calls2[0] == failed
    assert not (tmp_path / "finetune" / partial.name / "partial").exists()
    assert all((p / "results.json").stat().st_mtime_ns == t for p, t in mtimes.items())
    # a third run launches nothing; another command for an existing cell is refused
    calls3 = []
    monkeypatch.setattr(study, "launch", fake_launch(calls3))
    study.main(fake_args(tmp_path))
    assert calls3 == []
    with pytest.raises(SystemExit, match="was run with another command"):
        study.main(fake_args(tmp_path, "--batch-size", "32"))


def test_tsne_draws_jets_at_random(tmp_path):
    """test_repr.npz keeps the stream's order, one class after the other: the map must draw
    its jets from the whole file, not take the first ones (which were all of one class)."""
    cell = tmp_path / "finetune" / "scratch_L100"
    cell.mkdir(parents=True)
    y = np.repeat([0, 1], 50)
    np.savez(cell / "test_repr.npz", z=np.random.default_rng(0).normal(size=(100, 4)) + y[:, None],
             y=y)
    xy, got = study.tsne_map(tmp_path, "finetune/scratch_L100", 40)
    assert xy.shape == (40, 2) and 10 < got.sum() < 30
    assert (tmp_path / "tsne" / "scratch_L100_n40_s0.npz").exists()  # cached, by draw
    assert study.tsne_map(tmp_path, "finetune/scratch_L100", 30)[0].shape == (30, 2)


def test_jobs_run_cells_side_by_side(tmp_path, monkeypatch):
    """--jobs 3: the same cells and the same report as one at a time, with 3 running at once,
    each with its share of the cores; a failure stops the queue and a rerun finishes it."""
    serial = []
    monkeypatch.setattr(study, "launch", fake_launch(serial))
    one = study.main(fake_args(tmp_path / "a", "--tsne-jets", "0"))
    calls, envs, running, peak, lock = [], [], [0], [0], threading.Lock()

    def launch(cmd, log_path, in_process=False, env=None, fake=fake_launch(calls)):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            envs.append(env)
        deadline = time.time() + 10   # hold the first cells until 3 run at once
        while peak[0] < 3 and time.time() < deadline:
            time.sleep(0.01)
        try:
            return fake(cmd, log_path, in_process)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(study, "launch", launch)
    three = study.main(fake_args(tmp_path / "b", "--jobs", "3", "--tsne-jets", "0"))
    assert peak[0] == 3
    same = [[a.replace(str(tmp_path / "b"), str(tmp_path / "a")) for a in c] for c in calls]
    assert sorted(same) == sorted(serial)
    for r1, r3 in zip(one["rows"], three["rows"]):
        assert (r1["model"], r1["labels"], r1["cell"]) == (r3["model"], r3["labels"], r3["cell"])
        assert r1["stats"] == r3["stats"] and r1.get("vs_scratch") == r3.get("vs_scratch")
    threads = str(max(1, len(os.sched_getaffinity(0)) // 3))
    assert {e["OMP_NUM_THREADS"] for e in envs} == {threads}
    cell = json.loads(next((tmp_path / "b" / "finetune").glob("*/cell.json")).read_text())
    assert cell["env"]["OMP_NUM_THREADS"] == threads  # the figures depend on it: recorded
    # the 1st fine-tuning fails: the study stops with its one line, not every cell ran
    failing, fake = [], fake_launch([], fail_at=5)

    def counted(cmd, log_path, in_process=False, env=None):  # the fake counts its calls
        with lock:
            failing.append(cmd)
            return fake(cmd, log_path, in_process)

    monkeypatch.setattr(study, "launch", counted)
    with pytest.raises(SystemExit, match=r"cell finetune/\S+ failed; see .*log\.txt"):
        study.main(fake_args(tmp_path / "c", "--jobs", "2", "--tsne-jets", "0"))
    assert len(failing) < len(serial)
    rest = []
    monkeypatch.setattr(study, "launch", fake_launch(rest))
    again = study.main(fake_args(tmp_path / "c", "--jobs", "2", "--tsne-jets", "0"))
    assert len(failing) - 1 + len(rest) == len(serial)
    assert [r["stats"] for r in again["rows"]] == [r["stats"] for r in one["rows"]]
    with pytest.raises(SystemExit):
        study.get_args(["--jobs", "2", "--in-process"])


def test_failing_subprocess_names_cell_and_log(tmp_path):
    """The real launcher: a program's output goes to the cell's log; a non-zero exit stops the
    study with one line naming the cell and the log."""
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    args = fake_args(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        study.run_cell(args, "pretrain", "broken_n1", str(script), ["--out", "OUTDIR"],
                       "broken.pt")
    log = tmp_path / "out" / "pretrain" / ".tmp" / "broken_n1" / "log.txt"
    assert str(e.value) == f"study: cell pretrain/broken_n1 failed; see {log}"
    assert "about to fail" in log.read_text()
    ok = tmp_path / "ok.py"
    ok.write_text("import sys, pathlib\npathlib.Path(sys.argv[2], 'ok.pt').write_text('x')\n")
    cell = study.run_cell(args, "pretrain", "ok_n1", str(ok), ["--out", "OUTDIR"], "ok.pt")
    assert (cell / "ok.pt").exists() and not (cell.parent / ".tmp" / "ok_n1").exists()


# --- the real scripts, tiny ---------------------------------------------------------------------


def test_tiny_study_end_to_end(tiny_pythia10, tiny_pythia, tmp_path, capsys):
    """2 methods x 2 sizes x 2 label counts x 2 seeds with the real scripts (in-process: no torch
    import per cell)."""
    argv = ["--methods", "jetclr,mpm", "--pretrain-data", "pythia",
            "--pretrain-dir", str(tiny_pythia10),
            "--finetune-data", "pythia", "--finetune-dir", str(tiny_pythia),
            "--pretrain-jets", "32,64", "--labels", "20,all", "--seeds", "2", "--steps", "3",
            "--batch-size", "16", "--n-eval", "10",
            "--cheap-seeds", "2", "--no-probe", "--device", "cpu", "--in-process",
            "--out", str(tmp_path)]
    argv += [x for m in TINY_MODELS for x in ("--method-args", m)]
    res = study.main(study.get_args(argv))
    assert len(res["rows"]) == (2 + 4) * 2
    for r in res["rows"]:
        assert len(r["per_seed"]) == 2 and np.isfinite(r["stats"]["acc"]["mean"])
        assert len(r["history"]) == 2 and r["stats"]["steps"]["n"] == 2  # steps to best val
    assert {r["pretrain_jets"] for r in res["rows"]} == {0, 32, 64}
    md = (tmp_path / "study.md").read_text()
    assert "## 20 labels" in md and "## all labels" in md
    for png in ("labels.png", "pretrain_size.png", "tsne.png"):
        assert (tmp_path / png).exists(), png
    capsys.readouterr()
    study.main(study.get_args(argv))  # resume: everything is done
    assert capsys.readouterr().out.count("done, skipped") == 4 + 12


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
