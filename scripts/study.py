"""study.py: does pretraining help? The JetCLR scaling study (Zhao et al., arXiv 2408.09343) for
every method, in one command, with a protocol that can tell (issue 19).

For each method and each pretraining size N, pretrain on a class-balanced subset of N jets
(`<method>.py --n-jets N`, --pretrain-steps steps whatever N: the size axis measures data
diversity, not compute). Then fine-tune every checkpoint at every label count (finetune.py),
next to the same architecture from random weights (finetune.py --scratch: one scratch row per
architecture). Both arms get the same step budget and settings, and each seed draws one label
subset and one initial head that both arms share, so they are compared seed by seed. Every
pair shares one pretraining run per method and size. With --probe (default) a linear probe of
each frozen encoder, pretrained and random, says whether pretraining learned anything at all.
Pretraining uses "kin" features unless both sides are JetClass (Top Tagging has no particle ID
or impact parameters; methods without --features are kin-only), and J-JEPA the context frame.
Everything lands under --out:
  study.json         every cell: its command, results (per seed), paired differences, Holm p
  study.md           per label count: mean +- std of accuracy, AUC, 1/eps_B at eps_S = 0.5 and
                     0.3, max eps_S/sqrt(eps_B) (>= 10 background jets), steps to the best
                     validation and the seeds that converged (best before the last quarter);
                     then the paired gain over scratch with its 95% t interval, the paired
                     t-test p and, for AUC, Holm's correction over the table's pretrained rows
                     (marked where < 0.05), and the probe's gain over random weights; then the
                     pretraining runs (final SSL validation loss, change over the last quarter)
  gain.png           paired AUC gain over scratch against the number of labels, 95% intervals
  labels.png         1/eps_B(0.5) and accuracy against the number of labels (std bands)
  pretrain_size.png  1/eps_B(0.5) and steps to the best validation against the pretraining size
  tsne.png           t-SNE of fine-tuned test-jet vectors (smallest label count), scratch against
                     each method at its largest pretraining size
A cell is one program run (a subprocess: its memory is freed when it ends and its output is a
file, <kind>/<cell>/log.txt). It runs in <kind>/.tmp/<cell> and is renamed when it succeeds, so a
finished cell is never redone (rerun the same command to resume) and an interrupted one is
redone from its start. A failing cell stops the study with one line naming the cell and its log.

--grid METHOD replaces the methods axis by settings of one method (--sweep FLAG=V1,V2 ...,
cartesian product; diffmae's default is its mask-ratio x pred-ratio grid, mpm's v1 pT orders),
each pretrained and scored by finetune.py (--finetune-mode probe by default), with the same
tables and plots.

CPU study (issue 19 item 6; 2 cores). Data: ten-class jets without MPI for pretraining (50k
training jets; the 10k set is a class-balanced subset of them), and top vs QCD in the Top
Tagging window with MPI and another seed for fine-tuning (20k train, 2k val, 10k test):
  python -m scripts.jetgen --out data/study/pre --preset jetclass --classes all \
      --jets-per-class 6250 --split 0.8,0.1,0.1 --seed 101 --workers 2
  python -m scripts.jetgen --out data/study/ft --preset toptagging --classes QCD,Tbqq --mpi \
      --jets-per-class 16000 --split 0.625,0.0625,0.3125 --seed 202 --workers 2
  timeout 90m python -m scripts.study --methods jjepa,jetclr,mpm,diffmae --pretrain-data pythia \
      --pretrain-dir data/study/pre --finetune-data pythia --finetune-dir data/study/ft \
      --pretrain-jets 10000,50000 --pretrain-steps 2000 --labels 100,1000,10000 --seeds 5 \
      --cheap-seeds 10 --finetune-epochs 40 --finetune-min-steps 400 --batch-size 128 \
      --n-val 2000 --n-eval 10000 --device cpu --jobs 2 --out out/study_cpu \
      --method-args jjepa="--dim 32 --depth 2 --n-max 64" \
      --method-args jetclr="--dim 32 --depth 2 --n-max 64" \
      --method-args mpm="--dim 32 --depth 2 --dec-dim 32 --k 128 --kmeans-jets 4000 --n-max 64" \
      --method-args diffmae="--size tiny --n-max 64" --finetune-args "--n-max 64"
Rerun the last command until it writes study.md: a run cut short loses only its running cells.
8 pretraining runs of 2,000 steps (173-308 s each, 33 min); then 12 fine-tuning cells per label
count (4 scratch, 8 pretrained) of max(40 epochs, 400 steps) per seed (about 20 validations on
2,000 jets): 400 steps at 100 and 1,000 labels (10 seeds; 265-320 s for a cell alone on 2
cores), 3,160 at 10,000 (5 seeds), where scratch needs about 20 epochs to reach its best
validation (400 steps, 5 epochs, left every scratch seed short of it); then as many probe cells
(no backward pass through the encoder). --jobs 2 runs two cells at once with one
thread each: 2 single-seed runs take 48 s side by side against 35 s for one with 2 threads,
1.46x the throughput. The thread count changes a run's sums in the last bits, and a run that
overfits 100 labels can grow that into a different result. Rerun with 1 thread instead of 2,
the 4 scratch cells at 100 labels moved 1 of JetCLR's 10 seeds by +0.015 AUC and 3 of J-JEPA's
by up to 0.004 (MPM's and diffmae's by < 3e-6); 4 cells rerun with the same 1 thread came out
bit for bit the same. cell.json records the thread and GPU settings (OMP/MKL_NUM_THREADS,
CUDA_VISIBLE_DEVICES) each cell ran with; none recorded means torch's defaults. Two at a time,
a fine-tuning cell takes 402-585 s at 100 and 1,000 labels and 1,053-1,303 s at 10,000, a probe
cell 194-387 s at 400 steps; the whole study an estimated 6 to 7 h (the probe cells at 10,000
labels have not run with 3,160 steps).
GPU (the real study; see the README for the run time):
  python -m scripts.study --methods jjepa,jetclr,mpm,diffmae --pretrain-data jetclass \
      --finetune-data toptagging --pretrain-jets 1000000,10000000 \
      --labels 100,1000,10000,all --seeds 5 --n-eval 20000 --workers 8 --out out/study
CPU smoke run (generated jets):
  python -m scripts.study --methods jetclr,mpm --pretrain-data pythia --pretrain-dir D1 \
      --finetune-data pythia --finetune-dir D2 --pretrain-jets 400,800 --labels 100,all \
      --seeds 2 --steps 10 --device cpu --method-args jetclr="--dim 32 --depth 2" --out OUT
  python -m scripts.study --grid diffmae --pretrain-data pythia --pretrain-dir D1 \
      --finetune-data pythia --finetune-dir D2 --pretrain-jets 2000 --labels all --seeds 1 \
      --out out/grid
"""
import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import math
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import scipy.stats
import torch

import common
import diffmae
import finetune
import jetclr
import jjepa
import mpm

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("jjepa", "jetclr", "mpm", "diffmae")
# in-process entry points (--in-process): each script's own get_args and train/main
ENTRY = {"jjepa": (jjepa.get_args, jjepa.train), "jetclr": (jetclr.get_args, jetclr.train),
         "mpm": (mpm.get_args, mpm.train), "diffmae": (diffmae.get_args, diffmae.train),
         "finetune": (finetune.get_args, finetune.main)}
# grids swept when --grid METHOD comes without --sweep: the DiffMAE talk's mask x pred table,
# MPM v1's table of where the pT order enters
DEFAULT_SWEEPS = {"diffmae": ["mask-ratio=0.125,0.25,0.5,0.75",
                              "pred-ratio=1tok,0.125,0.25,0.5,0.75"],
                  "mpm": ["style=bert", "order=none,input,head"]}
# (name, results key, higher is better) of the table's columns
METRICS = [("acc", "acc", True), ("AUC", "auc", True), ("val AUC", "val_auc", True),
           ("1/eps_B(0.5)", "rej50", True),
           ("1/eps_B(0.3)", "rej30", True), ("max eps_S/sqrt(eps_B)", "sic", True),
           ("steps to best val", "steps", False)]
DIGITS = {"acc": 4, "auc": 4, "val_auc": 4, "sic": 2, "steps": 0}  # decimals shown; others 1
CHEAP_LABELS = 1000  # label counts up to this are cheap to fine-tune: they get --cheap-seeds
# flags a method's pretraining always gets (--method-args come later and override them):
# J-JEPA's "jet" frame leaks the targets' pT fraction into the context (issue 19 item 6)
METHOD_FLAGS = {"jjepa": ["--context-frame", "context"]}


# --- config ------------------------------------------------------------------------------------


def label_count(text):
    """One entry of --labels: a number of labelled jets, or "all"."""
    return text if text == "all" else int(text)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--methods", default="jjepa,jetclr,mpm,diffmae",
                   help=f"comma-separated pretraining methods ({', '.join(METHODS)})")
    g.add_argument("--grid", choices=METHODS, default=None,
                   help="sweep this method's settings (--sweep) instead of comparing methods")
    g.add_argument("--sweep", action="append", default=None, metavar="FLAG=V1,V2",
                   help="--grid: one swept flag of the method script (repeat for a cartesian "
                        "product)")
    g.add_argument("--method-args", action="append", default=[], metavar='METHOD="FLAGS"',
                   help='extra flags for one method script, e.g. jetclr="--dim 32 --depth 2" '
                        "(repeatable; they come last, so they override the study's)")
    g.add_argument("--finetune-args", default="", metavar='"FLAGS"',
                   help='extra flags for every finetune.py run, e.g. "--head mlp"')
    g = p.add_argument_group("data")
    g.add_argument("--pretrain-data", choices=["pythia", "jetclass", "toptagging"],
                   default="jetclass")
    g.add_argument("--pretrain-dir", default=None,
                   help="pretraining data folder (None: data/<data>)")
    g.add_argument("--finetune-data", choices=["pythia", "jetclass", "toptagging"],
                   default="toptagging")
    g.add_argument("--finetune-dir", default=None,
                   help="fine-tuning data folder (None: data/<data>)")
    g.add_argument("--pretrain-jets", default="10000,100000,1000000",
                   help="comma-separated pretraining sizes (class-balanced subsets)")
    g.add_argument("--labels", default="100,1000,10000,all",
                   help="comma-separated numbers of labelled fine-tuning jets, or all")
    g.add_argument("--n-eval", type=common.positive_int, default=None,
                   help="validation/test jets of every run, pretraining and fine-tuning "
                        "(None: each script's; >= 5000 resolves 1/eps_B at low labels)")
    g.add_argument("--n-val", type=common.positive_int, default=2000,
                   help="validation jets of every fine-tuning (scored ~20 times per run)")
    g.add_argument("--pretrain-features", choices=["auto", "kin", "full"], default="auto",
                   help="--features of the methods that have it (jjepa and jetclr are kin-only); "
                        "auto: full only from JetClass to JetClass, else kin (Top Tagging and the "
                        "generated top/QCD sets are compared on kinematics)")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=common.positive_int, default=5,
                   help="fine-tuning seeds per cell (seed, seed+1, ...): each seed's label subset "
                        "and initial head are shared by the pretrained and scratch arms")
    g.add_argument("--cheap-seeds", type=common.positive_int, default=10,
                   help=f"seeds at label counts up to {CHEAP_LABELS} (at least --seeds)")
    g.add_argument("--seed", type=common.nonneg_int, default=0,
                   help="seed of the pretraining, and of the first fine-tuning unless "
                        "--finetune-seed")
    g.add_argument("--finetune-seed", type=common.nonneg_int, default=None,
                   help="seed of the first fine-tuning (None: --seed); another value gives new "
                        "label subsets and heads on the same pretraining runs")
    g.add_argument("--steps", type=common.positive_int, default=None,
                   help="cap every pretraining and fine-tuning at this many optimizer steps "
                        "(smoke runs)")
    g.add_argument("--pretrain-epochs", type=common.positive_int, default=None,
                   help="pretraining epochs (None: the script's)")
    g.add_argument("--pretrain-steps", type=common.positive_int, default=None,
                   help="pretraining optimizer steps of every size (a fixed budget: the size axis "
                        "then measures data diversity, not compute); None: --pretrain-epochs")
    g.add_argument("--finetune-min-steps", type=common.nonneg_int, default=None,
                   help="finetune.py --min-steps, the same for both arms (None: finetune.py's)")
    g.add_argument("--backbone-lr-scale", default=None, metavar="S or METHOD[@LABELS]=S,...",
                   help="finetune.py --backbone-lr-scale, both arms of an architecture: one "
                        "number for every method, or one per method, e.g. jetclr=1,diffmae=0.1, "
                        "and per method and label count, e.g. diffmae@100=0.1 (the most "
                        "specific applies; a method not named, or None: finetune.py's)")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="also a linear probe (finetune.py --mode probe --head linear) of every "
                        "pretrained encoder and of its architecture with random weights")
    g.add_argument("--finetune-epochs", type=common.positive_int, default=None,
                   help="fine-tuning epochs (None: finetune.py's)")
    g.add_argument("--finetune-mode", choices=["finetune", "probe"], default=None,
                   help="finetune.py --mode (None: finetune; probe with --grid)")
    g.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="batch size of every run (None: each script's)")
    g.add_argument("--workers", type=common.nonneg_int, default=None,
                   help="data-loader workers of every run")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--jobs", type=common.positive_int, default=1,
                   help="cells run at once (CPU: each gets cores/jobs threads; GPUs: round robin)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/study", help="folder of the cells and the report")
    g.add_argument("--tsne-jets", type=common.nonneg_int, default=2000,
                   help="test jets per t-SNE map (0: no t-SNE)")
    g.add_argument("--in-process", action="store_true",
                   help="run the cells in this process (no torch import per cell: tests, "
                        "tiny runs)")
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({int(n) for n in args.pretrain_jets.split(",")})
        args.label_counts = sorted({label_count(x) for x in args.labels.split(",")},
                                   key=lambda x: math.inf if x == "all" else x)
    except ValueError:
        p.error(f"--pretrain-jets {args.pretrain_jets!r} / --labels {args.labels!r}: "
                "give integers separated by commas (labels may include all)")
    args.extra = {}
    for item in args.method_args:
        name, sep, flags = item.partition("=")
        if not sep or name not in METHODS:
            p.error(f"--method-args {item!r}: write METHOD=\"FLAGS\" with METHOD one of {METHODS}")
        args.extra[name] = args.extra.get(name, []) + shlex.split(flags)
    # (method, labels) -> scale; None stands for every method or every label count
    args.backbone_lr = {}
    for item in args.backbone_lr_scale.split(",") if args.backbone_lr_scale else []:
        key, sep, value = item.rpartition("=")
        name, at, labels = key.partition("@")
        try:
            n = label_count(labels) if at else None
            if sep and name not in METHODS or at and n != "all" and n <= 0:
                raise ValueError
            args.backbone_lr[name or None, n] = common.unit(value)
        except (ValueError, argparse.ArgumentTypeError):
            p.error(f"--backbone-lr-scale {args.backbone_lr_scale!r}: give one number in [0, 1] "
                    "or METHOD=S and METHOD@LABELS=S pairs separated by commas, METHOD one of "
                    f"{METHODS}")
    if args.grid:
        sweeps = args.sweep or DEFAULT_SWEEPS.get(args.grid)
        if not sweeps:
            p.error(f"--grid {args.grid}: give the settings to sweep with --sweep FLAG=V1,V2")
        args.variants = grid_variants(args.grid, sweeps)
    else:
        if args.sweep:
            p.error("--sweep needs --grid METHOD")
        names = args.methods.split(",")
        if bad := [m for m in names if m not in METHODS]:
            p.error(f"--methods: unknown {bad}; choose from {METHODS}")
        args.variants = [dict(name=m, method=m, flags=[]) for m in names]
    args.finetune_mode = args.finetune_mode or ("probe" if args.grid else "finetune")
    args.finetune_seed = args.seed if args.finetune_seed is None else args.finetune_seed
    if args.jobs > 1 and args.in_process:
        p.error("--jobs > 1 runs the cells as programs side by side; drop --in-process")
    return args


def grid_variants(method, sweeps):
    """--sweep FLAG=V1,V2 ... -> one variant per combination: dict(name, method, flags,
    setting)."""
    axes = []
    for s in sweeps:
        flag, sep, values = s.partition("=")
        if not sep or not values:
            raise SystemExit(f"--sweep {s!r}: write FLAG=V1,V2 (e.g. mask-ratio=0.25,0.5)")
        axes.append([(flag.lstrip("-"), v) for v in values.split(",")])
    variants = []
    for combo in itertools.product(*axes):
        setting = dict(combo)
        # CrossMAE decodes a subset of the hidden particles: diffmae caps pred at mask, so a
        # larger pred ratio would repeat the capped cell
        pred, mask = setting.get("pred-ratio"), setting.get("mask-ratio")
        if (method == "diffmae" and pred not in (None, "1tok") and mask
                and float(pred) > float(mask)):
            continue
        name = method + "_" + "_".join(f"{k}{v}" for k, v in combo)
        flags = [x for k, v in combo for x in (f"--{k}", v)]
        variants.append(dict(name=name, method=method, flags=flags, setting=setting))
    return variants


# --- cells: one program run each, atomic, never redone ------------------------------------------


def launch(cmd, log_path, in_process=False, env=None):
    """Run one program with stdout and stderr in log_path; True when it succeeded. cmd is
    [script.py, *argv] (run with this Python, in environment env) or, for --in-process, called
    through ENTRY."""
    with open(log_path, "w") as log:
        if not in_process:
            return subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env=env).returncode == 0
        get_args, run = ENTRY[Path(cmd[0]).stem]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                run(get_args(cmd[1:]))
            except SystemExit as e:
                if e.code not in (None, 0):
                    print(e.code)
                    return False
            except Exception:  # noqa: BLE001  (the traceback goes to the cell's log)
                traceback.print_exc()
                return False
    return True


def say(line):
    """Print one line in one write: print() writes the newline apart, so lines of cells that
    run at once came out joined."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


PINNED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
_TMP_LOCK = threading.Lock()  # cells that run at once share <kind>/.tmp: made and removed here


def run_cell(args, kind, name, script, argv, product, env=None):
    """Run `script argv` as cell <kind>/<name> unless <kind>/<name>/<product> exists. The run
    writes into <kind>/.tmp/<name> (argv says so through OUTDIR) and is renamed when it ends
    well."""
    final = Path(args.out) / kind / name
    tmp = Path(args.out) / kind / ".tmp" / name
    record = [script, *argv]
    if (final / product).exists():
        stored = final / "cell.json"
        if stored.exists() and json.loads(stored.read_text())["cmd"] != record:
            raise SystemExit(f"study: cell {kind}/{name} was run with another command ({stored}); "
                             "use a new --out or delete that cell")
        say(f"  {kind}/{name}: done, skipped")
        return final
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left behind
    with _TMP_LOCK:
        tmp.mkdir(parents=True)
    cmd = [str(ROOT / script)] + [str(tmp) + a[6:] if a.startswith("OUTDIR") else a for a in argv]
    t0 = time.time()
    say(f"  {kind}/{name}: python {shlex.join([script] + cmd[1:])}")
    if not launch(cmd, tmp / "log.txt", args.in_process, env) or not (tmp / product).exists():
        raise SystemExit(f"study: cell {kind}/{name} failed; see {tmp / 'log.txt'}")
    # the threads and GPU it ran with: on CPU the figures depend on the thread count (docstring)
    pinned = {k: v for k, v in (env or os.environ).items() if k in PINNED}
    (tmp / "cell.json").write_text(json.dumps(dict(cmd=record, seconds=time.time() - t0,
                                                   env=pinned), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    with _TMP_LOCK, contextlib.suppress(OSError):
        tmp.parent.rmdir()  # .tmp/, once no cell is running
    say(f"  {kind}/{name}: {time.time() - t0:.0f} s")
    return final


def opt(flag, value):
    return [] if value is None else [flag, str(value)]


def seeds_at(args, labels):
    """Fine-tuning seeds at this label count: more where runs are cheap, since the paired test's
    power grows with them."""
    cheap = labels != "all" and labels <= CHEAP_LABELS
    return max(args.seeds, args.cheap_seeds) if cheap else args.seeds


def takes(method, *flags):
    """Whether a method script accepts these flags (jjepa and jetclr have no --features)."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            ENTRY[method][0](list(flags))
        except SystemExit:
            return False
    return True


def features_of(args):
    if args.pretrain_features != "auto":
        return args.pretrain_features
    both_jetclass = args.pretrain_data == args.finetune_data == "jetclass"
    return "full" if both_jetclass else "kin"


def pretrain_argv(args, variant, n):
    """Pretraining command of one method setting at N jets; OUTDIR is the cell's folder."""
    method = variant["method"]
    features = ["--features", features_of(args)]
    steps = min(s for s in (args.steps, args.pretrain_steps, math.inf) if s)
    return (["--data", args.pretrain_data, *opt("--data-dir", args.pretrain_dir),
             "--n-jets", str(n), *opt("--n-eval", args.n_eval),
             *opt("--epochs", args.pretrain_epochs),
             *opt("--steps", None if steps == math.inf else steps),
             *opt("--batch-size", args.batch_size),
             *opt("--workers", args.workers), "--device", args.device, "--seed", str(args.seed),
             *(features if takes(method, *features) else []), *METHOD_FLAGS.get(method, []),
             "--out", "OUTDIR", *variant["flags"], *args.extra.get(method, [])])


def finetune_argv(args, name, ckpt, labels, scratch, probe=False, method=None):
    """Fine-tuning command; finetune.py writes <out>/<name>/, so out = the cell's parent folder.
    probe: the linear probe of the encoder (frozen), with the same budget and seeds. method: the
    architecture's method, for its --backbone-lr-scale."""
    mode = "probe" if probe else args.finetune_mode
    scale = next((args.backbone_lr[k] for k in ((method, labels), (method, None), (None, None))
                  if k in args.backbone_lr), None)
    return (["--ckpt", str(ckpt), *(["--scratch"] if scratch else []), "--mode", mode,
             "--data", args.finetune_data, *opt("--data-dir", args.finetune_dir),
             *([] if labels == "all" else ["--n-labels", str(labels)]),
             "--seeds", str(seeds_at(args, labels)),
             "--seed", str(args.finetune_seed),
             *opt("--epochs", args.finetune_epochs), *opt("--min-steps", args.finetune_min_steps),
             *opt("--backbone-lr-scale", scale),
             *opt("--steps", args.steps), *opt("--batch-size", args.batch_size),
             *opt("--n-eval", args.n_eval), *opt("--n-val", args.n_val),
             *opt("--workers", args.workers), "--device", args.device,
             "--out", str(Path(args.out) / "finetune" / ".tmp"), "--name", name,
             *shlex.split(args.finetune_args), *(["--head", "linear"] if probe else [])])


def finetune_cell(args, name, ckpt, labels, scratch, probe=False, method=None):
    """The cell (kind, name, script, argv, product) of one finetune.py run."""
    return ("finetune", name, "finetune.py",
            finetune_argv(args, name, ckpt, labels, scratch, probe, method), "results.json")


def cell_env(args, slot):
    """The environment of the cell that runs in slot 0..jobs-1 when --jobs > 1: on CPU each
    cell gets its share of the cores as torch threads (several small runs at once use 2 cores
    better than one), on GPUs slot k gets the k-th visible GPU, round robin."""
    env = dict(os.environ)
    if args.device == "cpu" or not torch.cuda.is_available():
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count())
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, (cores or 1) // args.jobs))
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = (visible.split(",") if visible
                else [str(i) for i in range(torch.cuda.device_count())])
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def run_cells(args, cells):
    """Run the cells, in order and --jobs at a time; their folders, in the same order. The first
    failure stops the study: the cells running then finish, the queued ones never start."""
    if args.jobs == 1:
        return [run_cell(args, *c) for c in cells]
    slots = queue.SimpleQueue()
    for k in range(args.jobs):
        slots.put(k)

    def one(cell):
        slot = slots.get()
        try:
            return run_cell(args, *cell, env=cell_env(args, slot))
        finally:
            slots.put(slot)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, c) for c in cells]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        pool.shutdown(cancel_futures=True)
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()
    return [f.result() for f in futures]


def architecture(ckpt):
    """What a scratch run of this checkpoint builds: (method, encoder config), as a string."""
    c = common.load_checkpoint(ckpt)
    return json.dumps([c["method"], c["encoder_config"]], sort_keys=True, default=str)


def run_study(args):
    """Every cell in order, skipping the finished ones: the pretrainings, then the fine-tunings
    (the study's answer), then the probes. Returns the rows: one per (model, pretraining size,
    labels), with the fine-tuning cell's folder."""
    out = Path(args.out)
    pre = [(v, n) for v in args.variants for n in args.sizes]
    done = run_cells(args, [("pretrain", f"{v['name']}_n{n}", f"{v['method']}.py",
                             pretrain_argv(args, v, n), f"{v['method']}.pt") for v, n in pre])
    ckpts = {(v["name"], n): cell / f"{v['method']}.pt" for (v, n), cell in zip(pre, done)}
    # one scratch model per architecture: the first variant's smallest checkpoint with it
    scratch = {}
    for v in args.variants:
        arch = architecture(ckpts[v["name"], args.sizes[0]])
        if arch not in scratch:
            name = f"scratch_{v['method']}"
            # a grid setting that changes the encoder
            if name in {s["name"] for s in scratch.values()}:
                name = f"scratch_{v['name']}"
            scratch[arch] = dict(name=name, ckpt=ckpts[v["name"], args.sizes[0]], variants=[],
                                 method=v["method"])
        scratch[arch]["variants"].append(v["name"])
    rows = []
    for labels in args.label_counts:
        for s in scratch.values():
            rows.append(dict(model=s["name"], scratch=True, variants=s["variants"],
                             method=s["method"], pretrain_jets=0, labels=labels,
                             ckpt=str(s["ckpt"])))
        for v in args.variants:
            base = next(s["name"] for s in scratch.values() if v["name"] in s["variants"])
            rows += [dict(model=v["name"], scratch=False, baseline=base, method=v["method"],
                          pretrain_jets=n, labels=labels, setting=v.get("setting"),
                          ckpt=str(ckpts[v["name"], n]))
                     for n in args.sizes]
    done = run_cells(args, [finetune_cell(args, cell_name(r), r["ckpt"], r["labels"], r["scratch"],
                                          method=r["method"]) for r in rows])
    for r, cell in zip(rows, done):
        r["cell"] = str(cell.relative_to(out))
    if args.probe:  # scratch: the random-weights probe
        done = run_cells(args, [finetune_cell(args, "probe_" + cell_name(r), r["ckpt"],
                                              r["labels"], r["scratch"], True, r["method"])
                                for r in rows])
        for r, cell in zip(rows, done):
            r["probe_cell"] = str(cell.relative_to(out))
    return rows


def cell_name(row):
    """The fine-tuning cell of a row: <model>_L<labels> for scratch, <model>_n<N>_L<labels>."""
    size = "" if row["scratch"] else f"_n{row['pretrain_jets']}"
    return f"{row['model']}{size}_L{row['labels']}"


# --- measures: mean +- std; paired differences, t intervals, Holm ------------------------------


def aggregate(values):
    """(mean, sample std, n) over seeds; nan std for a single seed; inf stays inf (no std)."""
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return dict(mean=math.nan, std=math.nan, n=0)
    if not np.isfinite(x).all():
        return dict(mean=float(np.mean(x)), std=math.nan, n=len(x))
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                n=len(x))


def paired(a, b):
    """Paired difference a - b over the seeds both arms ran (dicts seed -> value; a seed whose
    value is missing or infinite in either arm is left out): mean, its 95% interval from the t
    distribution with n - 1 degrees of freedom, and the two-sided paired t-test p-value."""
    seeds = [k for k in a if k in b and a[k] is not None and b[k] is not None
             and math.isfinite(a[k]) and math.isfinite(b[k])]
    x = np.array([a[k] for k in seeds], float)
    y = np.array([b[k] for k in seeds], float)
    d = x - y
    out = dict(mean=float(d.mean()) if len(d) else math.nan, lo=math.nan, hi=math.nan,
               p=math.nan, n=len(d))
    if len(d) < 2:
        return out
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    # every difference equal up to rounding: no spread to test against
    spread = np.ptp(d) > 1e-9 * np.abs(d).max()
    p = float(scipy.stats.ttest_rel(x, y).pvalue) if spread else math.nan
    return dict(out, lo=float(d.mean() - half), hi=float(d.mean() + half), p=p)


def holm(pvalues):
    """Holm's step-down adjusted p-values of one family, in the given order; nan stays nan and
    is not counted in the family. Reject at level a where the adjusted value is below a."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out.tolist()


def by_seed(per_seed, seeds, key):
    return {s: r.get(key) for s, r in zip(seeds, per_seed)}


def val_auc_at(history, step):
    """The validation AUC of the weights that were tested: the history's point at `step`."""
    return next((h["val_auc"] for h in history if h["step"] == step), None)


def summarize(out, rows):
    """Fill each row with its seeds' metrics (results.json's `per_seed`, `steps_to_converge`,
    `converged`, `history`) and their aggregates; each pretrained row with its paired
    differences from its scratch row (`vs_scratch`), its probe's from the random-weights probe
    (`probe`), and the Holm-adjusted p of its AUC (one family per label count)."""
    for r in rows:
        res = json.loads((Path(out) / r["cell"] / "results.json").read_text())
        per_seed = [dict(s, steps=t, val_auc=val_auc_at(h, t))
                    for s, t, h in zip(res["per_seed"], res["steps_to_converge"], res["history"])]
        r.update(n_train=res.get("n_train"), n_test=res.get("n_test"), per_seed=per_seed,
                 seeds=res["seeds"], history=res["history"], converged=res["converged"],
                 stats={k: aggregate([s.get(k) for s in per_seed]) for _, k, _ in METRICS})
        if r.get("probe_cell"):
            probe = json.loads((Path(out) / r["probe_cell"] / "results.json").read_text())
            r["probe_auc"] = by_seed(probe["per_seed"], probe["seeds"], "auc")
    for r in rows:
        if not r["scratch"]:
            base = scratch_of(rows, r)
            r["vs_scratch"] = {k: paired(by_seed(r["per_seed"], r["seeds"], k),
                                         by_seed(base["per_seed"], base["seeds"], k))
                               for _, k, _ in METRICS}
            if "probe_auc" in r:
                r["probe"] = paired(r["probe_auc"], base["probe_auc"])
    for labels in dict.fromkeys(r["labels"] for r in rows):
        family = [r for r in rows if r["labels"] == labels and not r["scratch"]]
        for r, p in zip(family, holm([r["vs_scratch"]["auc"]["p"] for r in family])):
            r["holm_p"] = p
    return rows


def ssl_curve(log_path):
    """(step, SSL validation loss) points of a pretraining log (<method>.jsonl); the scripts
    write the loss as val_loss or val.loss."""
    points = {}
    for line in Path(log_path).read_text().splitlines():
        r = json.loads(line)
        val = r.get("val") if isinstance(r.get("val"), dict) else {}
        loss = r.get("val_loss", val.get("loss"))
        if "step" in r and loss is not None:
            points[r["step"]] = loss
    return sorted(points.items())


def flattening(curve):
    """Relative change of the validation loss over the last quarter of the run: |L_end - L_q| /
    |L_end|, L_q at the first evaluation at or after 3/4 of the steps (nan if that is the end)."""
    if not curve:
        return math.nan
    end_step, end = curve[-1]
    start = next(v for s, v in curve if s >= 0.75 * end_step)
    late = [s for s, _ in curve if s >= 0.75 * end_step]
    return abs(end - start) / abs(end) if len(late) > 1 and end else math.nan


def pretraining_rows(rows):
    """One line per pretraining run: steps, final SSL validation loss, last-quarter change."""
    out = []
    for r in rows:
        log = Path(r["ckpt"]).with_suffix(".jsonl")
        if r["scratch"] or r["labels"] != rows[0]["labels"] or not log.exists():
            continue
        curve = ssl_curve(log)
        out.append(dict(model=r["model"], pretrain_jets=r["pretrain_jets"],
                        steps=curve[-1][0] if curve else None,
                        val_loss=curve[-1][1] if curve else None, change=flattening(curve)))
    return out


def scratch_of(rows, row):
    """The scratch row a pretrained row is compared with: its architecture, its label count."""
    return next(b for b in rows
                if b["scratch"] and b["model"] == row["baseline"] and b["labels"] == row["labels"])


# --- report: study.md, PNGs ----------------------------------------------------------------------


def fmt(s, key):
    if s["n"] == 0:
        return "-"
    digits = DIGITS.get(key, 1)
    std = "" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{std}"


def label_text(labels):
    return "all labels" if labels == "all" else f"{labels} labels"


def fmt_diff(d, key):
    """Paired difference with its 95% interval: '+0.0031 [+0.0012, +0.0050]'."""
    if d["n"] == 0 or math.isnan(d["mean"]):
        return "-"
    digits = DIGITS.get(key, 1)
    if math.isnan(d["lo"]):
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def fmt_p(p):
    return "-" if p is None or math.isnan(p) else f"{p:.2g}"


def verdict(r, level=0.05):
    """Holm-corrected AUC verdict of a pretrained row: +1 better, -1 worse, 0 undecided."""
    if not r["holm_p"] < level:  # nan (one seed, no spread) decides nothing
        return 0
    return 1 if r["vs_scratch"]["auc"]["mean"] > 0 else -1


def write_markdown(args, rows, path):
    mark = {1: " ▲", -1: " ▼", 0: ""}
    def seed_text(n):  # from the results, which hold the seeds that ran
        ran = sorted({k for r in rows if r["labels"] == n for k in r["seeds"]})
        return f"{seeds_at(args, n)} at {label_text(n)}" + (f" ({ran[0]}-{ran[-1]})" if ran else "")
    seeds = ", ".join(seed_text(n) for n in args.label_counts)
    lines = [f"# Pretraining study: {args.pretrain_data} -> {args.finetune_data}", "",
             f"Pretrained on {args.pretrain_data} ({args.pretrain_dir or 'default folder'}), "
             f"fine-tuned (`--mode {args.finetune_mode}`) on {args.finetune_data} "
             f"({args.finetune_dir or 'default folder'}); seeds: {seeds}"
             + (f"; backbone lr scale {args.backbone_lr_scale}" if args.backbone_lr else "")
             + ".", "",
             "How to read this:",
             "- Scratch is the same network as the pretrained one, started from random weights "
             "(one row per architecture). It is trained with the same steps and settings.",
             "- Each seed picks one set of labelled jets and one starting head, and both the "
             "pretrained and the scratch network use them. So we compare the two seed by seed "
             "(a paired comparison), which removes the luck of which jets were labelled.",
             "- \"gain\" is the average over seeds of (pretrained minus scratch). The numbers in "
             "brackets are a 95% interval for it: if the interval does not include 0, the gain is "
             "unlikely to be chance for that one comparison.",
             "- p is the chance of a gain at least this large in either direction if pretraining "
             "did nothing (paired t-test). Because we make several comparisons per table, we "
             "correct the AUC p-values of each table together (Holm's method): ▲ / ▼ mark a "
             "pretrained row whose AUC is better / worse than scratch with corrected p below "
             "0.05. Only AUC gets marks; the other columns show intervals only.",
             "- The probe column asks whether pretraining learned anything at all, with no "
             "fine-tuning: a linear classifier on the frozen pretrained encoder, minus the same "
             "on the same network with random weights (AUC).",
             "- val AUC: the validation AUC of the weights that were tested (the best of the "
             "run). Settings are chosen on it, never on the test columns.",
             "- steps to best val: the step whose validation AUC was best (those weights are "
             "tested); \"converged\" counts the seeds whose best came before the last quarter "
             "of the run (later, more steps might have helped).", ""]
    for labels in args.label_counts:
        sub = [r for r in rows if r["labels"] == labels]
        n_train = next((r["n_train"] for r in sub if r.get("n_train")), None)
        n_test = sub[0].get("n_test")
        head = f"## {label_text(labels)} ({n_train} training jets, {n_test} test jets)"
        lines += [head, "", "mean ± sample std over seeds", "",
                  "| model | pretraining jets | " + " | ".join(m for m, _, _ in METRICS)
                  + " | converged |", "|---|---:|" + "---:|" * (len(METRICS) + 1)]
        for r in sub:
            cells = [fmt(r["stats"][k], k) for _, k, _ in METRICS]
            conv = f"{sum(r['converged'])}/{len(r['converged'])}"
            size = "-" if r["scratch"] else r["pretrain_jets"]
            lines.append(f"| {r['model']} | {size} | " + " | ".join(cells) + f" | {conv} |")
        pre = [r for r in sub if not r["scratch"]]
        if pre:
            names = ["AUC gain", "p", "Holm p"] + [f"{m} gain" for m, k, _ in METRICS
                                                   if k != "auc"] + ["probe AUC gain"]
            lines += ["", "gain over scratch, paired by seed: mean [95% interval]", "",
                      "| model | pretraining jets | " + " | ".join(names) + " |",
                      "|---|---:|" + "---:|" * len(names)]
            for r in pre:
                d = r["vs_scratch"]
                cells = [fmt_diff(d["auc"], "auc") + mark[verdict(r)], fmt_p(d["auc"]["p"]),
                         fmt_p(r["holm_p"])]
                cells += [fmt_diff(d[k], k) for _, k, _ in METRICS if k != "auc"]
                cells.append(fmt_diff(r["probe"], "auc") if "probe" in r else "-")
                lines.append(f"| {r['model']} | {r['pretrain_jets']} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    pre_runs = pretraining_rows(rows)
    if pre_runs:
        lines += ["## Pretraining runs", "", "The SSL validation loss has flattened when it moves "
                  "by less than 1% over the last quarter of the steps.", "",
                  "| model | pretraining jets | steps | final SSL val loss "
                  "| last-quarter change |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['model']} | {p['pretrain_jets']} | {p['steps']} | {p['val_loss']:.4g} | "
                  f"{100 * p['change']:.2f}% |" for p in pre_runs]
        lines.append("")
    lines += ["## Where pretraining beats scratch in AUC (Holm-corrected p < 0.05), and where not",
              ""]
    pre = [r for r in rows if not r["scratch"]]
    for sign, word in ((1, "better than scratch"), (-1, "worse than scratch"), (0, "undecided")):
        hits = [f"{r['model']} n={r['pretrain_jets']} at {label_text(r['labels'])}" for r in pre
                if verdict(r) == sign]
        lines.append(f"- {word}: " + ("; ".join(hits) if hits else "none"))
    lines.append("")
    if args.grid and len(args.variants[0]["setting"]) == 2:
        lines += grid_matrix(args, rows)
    path.write_text("\n".join(lines) + "\n")


def grid_matrix(args, rows):
    """The two swept flags as rows x columns, accuracy at the largest pretraining size."""
    (f1, f2) = list(args.variants[0]["setting"])
    v1 = list(dict.fromkeys(v["setting"][f1] for v in args.variants))
    v2 = list(dict.fromkeys(v["setting"][f2] for v in args.variants))
    lines = []
    for labels in args.label_counts:
        acc = {(r["setting"][f1], r["setting"][f2]): r["stats"]["acc"]["mean"] for r in rows
               if not r["scratch"] and r["labels"] == labels
               and r["pretrain_jets"] == args.sizes[-1]}
        lines += [f"## Accuracy, {label_text(labels)}, {args.sizes[-1]} pretraining jets: "
                  f"rows {f1}, columns {f2}",
                  "", f"| {f1} | " + " | ".join(v2) + " |", "|---|" + "---:|" * len(v2)]
        lines += [f"| {a} | "
                  + " | ".join(f"{acc[a, b]:.4f}" if (a, b) in acc else "-" for b in v2) + " |"
                  for a in v1]
        lines.append("")
    return lines


def save_fig(fig, path):
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def band(ax, x, stats, key, **kw):
    """Mean line and a mean +- std band over the points where the metric is finite."""
    m = np.array([s[key]["mean"] for s in stats])
    sd = np.nan_to_num(np.array([s[key]["std"] for s in stats]))
    ok = np.isfinite(m)
    if ok.any():
        x = np.asarray(x, dtype=float)[ok]
        line, = ax.plot(x, m[ok], marker="o", **kw)
        ax.fill_between(x, (m - sd)[ok], (m + sd)[ok], color=line.get_color(), alpha=0.2)


def plot_labels(args, rows, path):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # scratch: its first variant's
    colour = {v["name"]: f"C{i}" for i, v in enumerate(args.variants)}
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows
               if r["model"] == model and r["pretrain_jets"] in (0, args.sizes[-1])]
        scratch = sub[0]["scratch"]
        label = model if scratch else f"{model} ({args.sizes[-1]} pretraining jets)"
        for ax, key in zip(axes, ("rej50", "acc")):
            band(ax, [r["n_train"] for r in sub], [r["stats"] for r in sub], key, label=label,
                 color=colour[sub[0]["variants"][0] if scratch else model],
                 ls="--" if scratch else "-")
    for ax, name in zip(axes, ("1/eps_B at eps_S = 0.5", "accuracy")):
        ax.set(xscale="log", xlabel="labelled training jets", ylabel=name)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def plot_sizes(args, rows, path):
    import matplotlib.pyplot as plt
    n = len(args.label_counts)
    fig, axes = plt.subplots(n, 2, figsize=(10, 3.2 * n), squeeze=False)
    pre = list(dict.fromkeys(r["model"] for r in rows if not r["scratch"]))
    for row, labels in zip(axes, args.label_counts):
        for i, model in enumerate(pre):
            sub = [r for r in rows if r["model"] == model and r["labels"] == labels]
            base = scratch_of(rows, sub[0])
            for ax, key in zip(row, ("rej50", "steps")):
                band(ax, [r["pretrain_jets"] for r in sub], [r["stats"] for r in sub], key,
                     label=model, color=f"C{i}")
                if math.isfinite(base["stats"][key]["mean"]):
                    ax.axhline(base["stats"][key]["mean"], color=f"C{i}", ls=":", lw=1)
        row[0].set(xscale="log", ylabel="1/eps_B at eps_S = 0.5", title=label_text(labels))
        row[1].set(xscale="log", ylabel="steps to best validation",
                   title=f"{label_text(labels)} (dotted: scratch)")
    for ax in axes[-1]:
        ax.set_xlabel("pretraining jets")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def plot_gain(args, rows, path):
    """Paired AUC gain over scratch against the number of labels, with its 95% interval: one
    line per model and pretraining size."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    pre = list(dict.fromkeys((r["model"], r["pretrain_jets"]) for r in rows if not r["scratch"]))
    for i, (model, n) in enumerate(pre):
        sub = [r for r in rows if (r["model"], r["pretrain_jets"]) == (model, n)]
        x = np.array([r["n_train"] for r in sub], float) * (1 + 0.03 * i)  # bars side by side
        d = [r["vs_scratch"]["auc"] for r in sub]
        mean = np.array([v["mean"] for v in d])
        err = np.nan_to_num(np.array([[v["mean"] - v["lo"], v["hi"] - v["mean"]] for v in d]).T)
        ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=f"C{i}",
                    label=f"{model} ({n} pretraining jets)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="labelled training jets",
           ylabel="AUC gain over scratch (paired, 95% interval)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def tsne_map(out, cell, n_jets, seed=0):
    """2-D t-SNE of n_jets drawn at random from a fine-tuning cell's test_repr.npz (cached in
    tsne/<cell>_n<n_jets>_s<seed>.npz, so that another draw is not served an old map), or None.
    Not the first n_jets: the file keeps the stream's order, which reads one class after another."""
    src = Path(out) / cell / "test_repr.npz"
    cache = Path(out) / "tsne" / f"{Path(cell).name}_n{n_jets}_s{seed}.npz"
    if cache.exists():
        d = np.load(cache)
        return d["xy"], d["y"]
    if not src.exists():
        return None
    from sklearn.manifold import TSNE
    d = np.load(src)
    pick = np.sort(np.random.default_rng(seed).permutation(len(d["y"]))[:n_jets])
    z, y = d["z"][pick], d["y"][pick]
    perplexity = min(30.0, max(1.0, (len(z) - 1) / 3))
    xy = TSNE(2, perplexity=perplexity, init="pca",
              random_state=seed).fit_transform(z.astype(np.float64))
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, xy=xy, y=y)
    os.replace(tmp, cache)
    return xy, y


def plot_tsne(args, rows, path):
    """Scratch (left) against pretrained at the largest size (right), one row per model, at the
    smallest label count. Returns False when a cell has no test_repr.npz."""
    import matplotlib.pyplot as plt
    labels = args.label_counts[0]
    pairs = []
    for r in rows:
        if not r["scratch"] and r["labels"] == labels and r["pretrain_jets"] == args.sizes[-1]:
            pairs.append((scratch_of(rows, r), r))
    maps = {r["cell"]: tsne_map(args.out, r["cell"], args.tsne_jets, args.seed)
            for pair in pairs for r in pair}
    if not pairs or any(m is None for m in maps.values()):
        return False
    fig, axes = plt.subplots(len(pairs), 2, figsize=(8, 3.8 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        for ax, r in zip(row, pair):
            xy, y = maps[r["cell"]]
            names = json.loads((Path(args.out) / r["cell"] / "results.json")
                               .read_text()).get("classes")
            for c in np.unique(y):
                ax.scatter(*xy[y == c].T, s=3, alpha=0.6,
                           label=names[c] if names else f"class {c}")
            size = "" if r["scratch"] else f", {r['pretrain_jets']} pretraining jets"
            ax.set_title(f"{r['model']}{size}, {label_text(labels)}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)
    return True


def report(args, rows):
    import matplotlib
    matplotlib.use("Agg")
    out = Path(args.out)
    rows = summarize(out, rows)
    meta = {k: v for k, v in vars(args).items()
            if k not in ("sizes", "label_counts", "extra", "backbone_lr")}  # parsed from flags
    study = dict(args=meta, git=common.git_hash(), versions=common.versions(), rows=rows)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1, default=str))
    os.replace(tmp, out / "study.json")
    write_markdown(args, rows, out / "study.md")
    plot_labels(args, rows, out / "labels.png")
    plot_gain(args, rows, out / "gain.png")
    if len(args.sizes) > 1:
        plot_sizes(args, rows, out / "pretrain_size.png")
    made = args.tsne_jets > 0 and plot_tsne(args, rows, out / "tsne.png")
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, labels.png, gain.png"
          + (", pretrain_size.png" if len(args.sizes) > 1 else "")
          + (", tsne.png" if made
             else " (no t-SNE: --tsne-jets 0, or a cell without test_repr.npz)"))
    return study


def main(args):
    # two studies in one --out would delete each other's running cells (run_cell's .tmp)
    common.lock_output(Path(args.out) / "study.json")
    n_pre = len(args.variants) * len(args.sizes)
    print(f"study: {len(args.variants)} model(s) x {len(args.sizes)} size(s) = "
          f"{n_pre} pretraining runs, then fine-tuning with "
          + ", ".join(f"{seeds_at(args, n)} seeds at {label_text(n)}" for n in args.label_counts)
          + f"; {args.jobs} cell(s) at once; out {args.out}, git {common.git_hash()}")
    rows = run_study(args)
    return report(args, rows)


if __name__ == "__main__":
    main(get_args())
