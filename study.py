"""study.py: the JetCLR scaling study (Zhao et al., arXiv 2408.09343) for every method, in one command.

For each method and each pretraining size N, pretrain on a class-balanced subset of N jets
(`<method>.py --n-jets N`). Then fine-tune every checkpoint at every label count with --seeds
seeds (finetune.py), next to the same architecture from random weights (finetune.py --scratch:
one scratch row per architecture; methods build different encoders, so each method gets its
own). Pretraining and fine-tuning may read different datasets: the transfer (JetClass -> Top
Tagging) is the point. Everything lands under --out:
  study.json         every cell: its command, results (mean, std, per seed) and convergence
  study.md           one table per label count: model x pretraining size; accuracy, AUC,
                     1/eps_B at eps_S = 0.5 and 0.3, epochs to converge (first validation within
                     1% of the final accuracy), mean +- std over seeds; scratch first; differences
                     from scratch beyond 2 sigma marked, and a plain list of where they are not
  labels.png         1/eps_B(0.5) and accuracy against the number of labels (std bands)
  pretrain_size.png  1/eps_B(0.5) and convergence epochs against the pretraining size
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

GPU (the real study; see the README for the run time):
  python study.py --methods jjepa,jetclr,mpm,diffmae --pretrain-data jetclass --finetune-data \
      toptagging --pretrain-jets 1000000,10000000 --labels 100,1000,10000,all --seeds 5 \
      --n-eval 20000 --workers 8 --out out/study
CPU smoke run (generated jets):
  python study.py --methods jetclr,mpm --pretrain-data pythia --pretrain-dir D1 --finetune-data \
      pythia --finetune-dir D2 --pretrain-jets 400,800 --labels 100,all --seeds 2 --steps 10 \
      --device cpu --method-args jetclr="--dim 32 --depth 2" --out OUT
  python study.py --grid diffmae --pretrain-data pythia --pretrain-dir D1 --finetune-data pythia \
      --finetune-dir D2 --pretrain-jets 2000 --labels all --seeds 1 --out out/grid
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import common
import diffmae
import finetune
import jetclr
import jjepa
import mpm

ROOT = Path(__file__).resolve().parent
METHODS = ("jjepa", "jetclr", "mpm", "diffmae")
# in-process entry points (--in-process): each script's own get_args and train/main
ENTRY = {"jjepa": (jjepa.get_args, jjepa.train), "jetclr": (jetclr.get_args, jetclr.train),
         "mpm": (mpm.get_args, mpm.train), "diffmae": (diffmae.get_args, diffmae.train),
         "finetune": (finetune.get_args, finetune.main)}
# grids swept when --grid METHOD comes without --sweep: the DiffMAE talk's mask x pred table,
# MPM v1's table of where the pT order enters
DEFAULT_SWEEPS = {"diffmae": ["mask-ratio=0.125,0.25,0.5,0.75", "pred-ratio=1tok,0.125,0.25,0.5,0.75"],
                  "mpm": ["style=bert", "order=none,input,head"]}
# (name, results key, higher is better) of the table's columns
METRICS = [("acc", "acc", True), ("AUC", "auc", True), ("1/eps_B(0.5)", "rej50", True),
           ("1/eps_B(0.3)", "rej30", True), ("epochs to converge", "epochs", False)]


# --- config ------------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--methods", default="jjepa,jetclr,mpm,diffmae",
                   help=f"comma-separated pretraining methods ({', '.join(METHODS)})")
    g.add_argument("--grid", choices=METHODS, default=None,
                   help="sweep this method's settings (--sweep) instead of comparing methods")
    g.add_argument("--sweep", action="append", default=None, metavar="FLAG=V1,V2",
                   help="--grid: one swept flag of the method script (repeat for a cartesian product)")
    g.add_argument("--method-args", action="append", default=[], metavar='METHOD="FLAGS"',
                   help='extra flags for one method script, e.g. jetclr="--dim 32 --depth 2" '
                        "(repeatable; they come last, so they override the study's)")
    g.add_argument("--finetune-args", default="", metavar='"FLAGS"',
                   help='extra flags for every finetune.py run, e.g. "--head mlp"')
    g = p.add_argument_group("data")
    g.add_argument("--pretrain-data", choices=["pythia", "jetclass", "toptagging"], default="jetclass")
    g.add_argument("--pretrain-dir", default=None, help="pretraining data folder (None: data/<data>)")
    g.add_argument("--finetune-data", choices=["pythia", "jetclass", "toptagging"], default="toptagging")
    g.add_argument("--finetune-dir", default=None, help="fine-tuning data folder (None: data/<data>)")
    g.add_argument("--pretrain-jets", default="10000,100000,1000000",
                   help="comma-separated pretraining sizes (class-balanced subsets)")
    g.add_argument("--labels", default="100,1000,10000,all",
                   help="comma-separated numbers of labelled fine-tuning jets, or all")
    g.add_argument("--n-eval", type=common.positive_int, default=None,
                   help="validation/test jets of every run, pretraining and fine-tuning (None: each "
                        "script's; >= 5000 resolves 1/eps_B at low labels)")
    g = p.add_argument_group("training")
    g.add_argument("--seeds", type=common.positive_int, default=5, help="fine-tuning seeds per cell (seed, seed+1, ...)")
    g.add_argument("--seed", type=common.nonneg_int, default=0, help="seed of the pretraining and the first fine-tuning")
    g.add_argument("--steps", type=common.positive_int, default=None,
                   help="cap every pretraining and fine-tuning at this many optimizer steps (smoke runs)")
    g.add_argument("--pretrain-epochs", type=common.positive_int, default=None,
                   help="pretraining epochs (None: the script's)")
    g.add_argument("--finetune-epochs", type=common.positive_int, default=None,
                   help="fine-tuning epochs (None: finetune.py's)")
    g.add_argument("--finetune-mode", choices=["finetune", "probe"], default=None,
                   help="finetune.py --mode (None: finetune; probe with --grid)")
    g.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="batch size of every run (None: each script's)")
    g.add_argument("--workers", type=common.nonneg_int, default=None,
                   help="data-loader workers of every run")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/study", help="folder of the cells and the report")
    g.add_argument("--tsne-jets", type=common.nonneg_int, default=2000, help="test jets per t-SNE map (0: no t-SNE)")
    g.add_argument("--in-process", action="store_true",
                   help="run the cells in this process (no torch import per cell: tests, tiny runs)")
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({int(n) for n in args.pretrain_jets.split(",")})
        args.label_counts = sorted({x if x == "all" else int(x) for x in args.labels.split(",")},
                                   key=lambda x: math.inf if x == "all" else x)
    except ValueError:
        p.error(f"--pretrain-jets {args.pretrain_jets!r} / --labels {args.labels!r}: give integers "
                "separated by commas (labels may include all)")
    args.extra = {}
    for item in args.method_args:
        name, sep, flags = item.partition("=")
        if not sep or name not in METHODS:
            p.error(f"--method-args {item!r}: write METHOD=\"FLAGS\" with METHOD one of {METHODS}")
        args.extra[name] = args.extra.get(name, []) + shlex.split(flags)
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
    return args


def grid_variants(method, sweeps):
    """--sweep FLAG=V1,V2 ... -> one variant per combination: dict(name, method, flags, setting)."""
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
        if method == "diffmae" and pred not in (None, "1tok") and mask and float(pred) > float(mask):
            continue
        name = method + "_" + "_".join(f"{k}{v}" for k, v in combo)
        flags = [x for k, v in combo for x in (f"--{k}", v)]
        variants.append(dict(name=name, method=method, flags=flags, setting=setting))
    return variants


# --- cells: one program run each, atomic, never redone ------------------------------------------


def launch(cmd, log_path, in_process=False):
    """Run one program with stdout and stderr in log_path; True when it succeeded. cmd is
    [script.py, *argv] (run with this Python) or, for --in-process, called through ENTRY."""
    with open(log_path, "w") as log:
        if not in_process:
            return subprocess.run([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT).returncode == 0
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


def run_cell(args, kind, name, script, argv, product):
    """Run `script argv` as cell <kind>/<name> unless <kind>/<name>/<product> exists. The run
    writes into <kind>/.tmp/<name> (argv says so through OUTDIR) and is renamed when it ends well."""
    final, tmp = Path(args.out) / kind / name, Path(args.out) / kind / ".tmp" / name
    record = [script, *argv]
    if (final / product).exists():
        stored = final / "cell.json"
        if stored.exists() and json.loads(stored.read_text())["cmd"] != record:
            raise SystemExit(f"study: cell {kind}/{name} was run with another command ({stored}); "
                             "use a new --out or delete that cell")
        print(f"  {kind}/{name}: done, skipped")
        return final
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left behind
    tmp.mkdir(parents=True)
    cmd = [str(ROOT / script)] + [str(tmp) + a[6:] if a.startswith("OUTDIR") else a for a in argv]
    t0 = time.time()
    print(f"  {kind}/{name}: python {shlex.join([script] + cmd[1:])}", flush=True)
    if not launch(cmd, tmp / "log.txt", args.in_process) or not (tmp / product).exists():
        raise SystemExit(f"study: cell {kind}/{name} failed; see {tmp / 'log.txt'}")
    (tmp / "cell.json").write_text(json.dumps(dict(cmd=record, seconds=time.time() - t0), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        tmp.parent.rmdir()  # .tmp/, once no cell is running
    print(f"  {kind}/{name}: {time.time() - t0:.0f} s", flush=True)
    return final


def opt(flag, value):
    return [] if value is None else [flag, str(value)]


def pretrain_argv(args, variant, n):
    """Pretraining command of one method setting at N jets; OUTDIR is the cell's folder."""
    return (["--data", args.pretrain_data, *opt("--data-dir", args.pretrain_dir), "--n-jets", str(n),
             *opt("--n-eval", args.n_eval), *opt("--epochs", args.pretrain_epochs),
             *opt("--steps", args.steps), *opt("--batch-size", args.batch_size),
             *opt("--workers", args.workers), "--device", args.device, "--seed", str(args.seed),
             "--out", "OUTDIR", *variant["flags"], *args.extra.get(variant["method"], [])])


def finetune_argv(args, name, ckpt, labels, scratch):
    """Fine-tuning command; finetune.py writes <out>/<name>/, so out = the cell's parent folder."""
    return (["--ckpt", str(ckpt), *(["--scratch"] if scratch else []), "--mode", args.finetune_mode,
             "--data", args.finetune_data, *opt("--data-dir", args.finetune_dir),
             *([] if labels == "all" else ["--n-labels", str(labels)]),
             "--seeds", str(args.seeds), "--seed", str(args.seed), *opt("--epochs", args.finetune_epochs),
             *opt("--steps", args.steps), *opt("--batch-size", args.batch_size),
             *opt("--n-eval", args.n_eval), *opt("--workers", args.workers), "--device", args.device,
             "--out", str(Path(args.out) / "finetune" / ".tmp"), "--name", name,
             *shlex.split(args.finetune_args)])


def finetune_cell(args, name, ckpt, labels, scratch):
    return run_cell(args, "finetune", name, "finetune.py", finetune_argv(args, name, ckpt, labels, scratch),
                    "results.json")


def architecture(ckpt):
    """What a scratch run of this checkpoint builds: (method, encoder config), as a string."""
    c = common.load_checkpoint(ckpt)
    return json.dumps([c["method"], c["encoder_config"]], sort_keys=True, default=str)


def run_study(args):
    """Every cell in order (pretraining first), skipping the finished ones. Returns the rows:
    one per (model, pretraining size, labels), with the fine-tuning cell's folder."""
    out = Path(args.out)
    ckpts = {}
    for v in args.variants:
        for n in args.sizes:
            cell = run_cell(args, "pretrain", f"{v['name']}_n{n}", f"{v['method']}.py",
                            pretrain_argv(args, v, n), f"{v['method']}.pt")
            ckpts[v["name"], n] = cell / f"{v['method']}.pt"
    # one scratch model per architecture: the first variant's smallest checkpoint with it
    scratch = {}
    for v in args.variants:
        arch = architecture(ckpts[v["name"], args.sizes[0]])
        if arch not in scratch:
            name = f"scratch_{v['method']}"
            if name in {s["name"] for s in scratch.values()}:  # a grid setting that changes the encoder
                name = f"scratch_{v['name']}"
            scratch[arch] = dict(name=name, ckpt=ckpts[v["name"], args.sizes[0]], variants=[])
        scratch[arch]["variants"].append(v["name"])
    rows = []
    for labels in args.label_counts:
        for s in scratch.values():
            cell = finetune_cell(args, f"{s['name']}_L{labels}", s["ckpt"], labels, scratch=True)
            rows.append(dict(model=s["name"], scratch=True, variants=s["variants"], pretrain_jets=0,
                             labels=labels, cell=str(cell.relative_to(out))))
        for v in args.variants:
            base = next(s["name"] for s in scratch.values() if v["name"] in s["variants"])
            for n in args.sizes:
                cell = finetune_cell(args, f"{v['name']}_n{n}_L{labels}", ckpts[v["name"], n], labels, False)
                rows.append(dict(model=v["name"], scratch=False, baseline=base, pretrain_jets=n,
                                 labels=labels, setting=v.get("setting"), cell=str(cell.relative_to(out))))
    return rows


# --- measures: mean +- std, 2 sigma -------------------------------------------------------------


def aggregate(values):
    """(mean, sample std, n) over seeds; nan std for a single seed; inf stays inf (no std)."""
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return dict(mean=math.nan, std=math.nan, n=0)
    if not np.isfinite(x).all():
        return dict(mean=float(np.mean(x)), std=math.nan, n=len(x))
    return dict(mean=float(x.mean()), std=float(x.std(ddof=1)) if len(x) > 1 else math.nan, n=len(x))


def compare(a, b, higher_is_better=True):
    """+1 / -1 when a beats / trails b by more than 2 sigma of the difference of the means,
    sigma = sqrt(s_a^2/n_a + s_b^2/n_b) (s: sample std over seeds); 0 otherwise or when a sigma
    is unknown (one seed, infinite values)."""
    d = a["mean"] - b["mean"]
    sigma = math.sqrt(a["std"] ** 2 / max(a["n"], 1) + b["std"] ** 2 / max(b["n"], 1))
    if not (math.isfinite(d) and math.isfinite(sigma)) or abs(d) <= 2 * sigma:
        return 0
    return int(np.sign(d)) * (1 if higher_is_better else -1)


def summarize(out, rows):
    """Fill each row with its seeds' metrics (results.json's `per_seed`, `history` and
    `epochs_to_converge`, as finetune.py defines it) and their aggregates."""
    for r in rows:
        res = json.loads((Path(out) / r["cell"] / "results.json").read_text())
        per_seed = [dict(s, epochs=e) for s, e in zip(res["per_seed"], res["epochs_to_converge"])]
        r.update(n_train=res.get("n_train"), n_test=res.get("n_test"), per_seed=per_seed,
                 history=res["history"],
                 stats={k: aggregate([s.get(k) for s in per_seed]) for _, k, _ in METRICS})
    for r in rows:
        if not r["scratch"]:
            base = scratch_of(rows, r)
            r["vs_scratch"] = {k: compare(r["stats"][k], base["stats"][k], hi) for _, k, hi in METRICS}
    return rows


def scratch_of(rows, row):
    """The scratch row a pretrained row is compared with: its architecture, its label count."""
    return next(b for b in rows
                if b["scratch"] and b["model"] == row["baseline"] and b["labels"] == row["labels"])


# --- report: study.md, PNGs ----------------------------------------------------------------------


def fmt(s, key):
    if s["n"] == 0:
        return "-"
    digits = 4 if key in ("acc", "auc") else 1
    std = "" if math.isnan(s["std"]) else f" ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{std}"


def label_text(labels):
    return "all labels" if labels == "all" else f"{labels} labels"


def write_markdown(args, rows, path):
    mark = {1: " ▲", -1: " ▼", 0: ""}
    n_seeds = args.seeds
    lines = [f"# Pretraining study: {args.pretrain_data} -> {args.finetune_data}", "",
             f"Pretrained on {args.pretrain_data} ({args.pretrain_dir or 'default folder'}), "
             f"fine-tuned (`--mode {args.finetune_mode}`) on {args.finetune_data} "
             f"({args.finetune_dir or 'default folder'}); mean ± sample std over {n_seeds} seed(s). "
             "Scratch = the same architecture from random weights (one row per architecture). "
             "▲ / ▼: better / worse than that scratch row by more than 2 sigma of the difference of "
             "the means (sigma² = s₁²/n₁ + s₂²/n₂). Epochs to converge (finetune.py's "
             "`epochs_to_converge`): the first validation whose accuracy is within 1% (relative) of "
             "the final validation accuracy; fewer is better.", ""]
    for labels in args.label_counts:
        sub = [r for r in rows if r["labels"] == labels]
        n_train = next((r["n_train"] for r in sub if r.get("n_train")), None)
        lines += [f"## {label_text(labels)} ({n_train} training jets, {sub[0].get('n_test')} test jets)", "",
                  "| model | pretraining jets | " + " | ".join(m for m, _, _ in METRICS) + " |",
                  "|---|---:|" + "---:|" * len(METRICS)]
        for r in sub:
            cells = [fmt(r["stats"][k], k) + ("" if r["scratch"] else mark[r["vs_scratch"][k]])
                     for _, k, _ in METRICS]
            size = "-" if r["scratch"] else r["pretrain_jets"]
            lines.append(f"| {r['model']} | {size} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Where pretraining beats scratch, and where it does not", ""]
    pre = [r for r in rows if not r["scratch"]]
    for sign, word in ((1, "better"), (-1, "worse")):
        hits = [f"{r['model']} n={r['pretrain_jets']} at {label_text(r['labels'])}: "
                + ", ".join(m for m, k, _ in METRICS if r["vs_scratch"][k] == sign) for r in pre
                if sign in r["vs_scratch"].values()]
        lines.append(f"- {word} than scratch beyond 2 sigma: " + ("; ".join(hits) if hits else "nowhere"))
    none = [f"{r['model']} n={r['pretrain_jets']} at {label_text(r['labels'])}" for r in pre
            if not any(r["vs_scratch"].values())]
    n_cmp = sum(len(r["vs_scratch"]) for r in pre)
    n_win = sum(v == 1 for r in pre for v in r["vs_scratch"].values())
    lines += [f"- no metric differs from scratch beyond 2 sigma: " + ("; ".join(none) if none else "none"),
              f"- in all, pretraining wins {n_win} of {n_cmp} comparisons"
              + (" (one seed: no sigma, nothing can be marked)" if n_seeds < 2 else ""), ""]
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
               if not r["scratch"] and r["labels"] == labels and r["pretrain_jets"] == args.sizes[-1]}
        lines += [f"## Accuracy, {label_text(labels)}, {args.sizes[-1]} pretraining jets: "
                  f"rows {f1}, columns {f2}",
                  "", f"| {f1} | " + " | ".join(v2) + " |", "|---|" + "---:|" * len(v2)]
        lines += [f"| {a} | " + " | ".join(f"{acc[a, b]:.4f}" if (a, b) in acc else "-" for b in v2) + " |"
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
    colour = {v["name"]: f"C{i}" for i, v in enumerate(args.variants)}  # scratch: its first variant's
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model and r["pretrain_jets"] in (0, args.sizes[-1])]
        scratch = sub[0]["scratch"]
        label = model if scratch else f"{model} ({args.sizes[-1]} pretraining jets)"
        for ax, key in zip(axes, ("rej50", "acc")):
            band(ax, [r["n_train"] for r in sub], [r["stats"] for r in sub], key, label=label,
                 color=colour[sub[0]["variants"][0] if scratch else model], ls="--" if scratch else "-")
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
            for ax, key in zip(row, ("rej50", "epochs")):
                band(ax, [r["pretrain_jets"] for r in sub], [r["stats"] for r in sub], key, label=model,
                     color=f"C{i}")
                if math.isfinite(base["stats"][key]["mean"]):
                    ax.axhline(base["stats"][key]["mean"], color=f"C{i}", ls=":", lw=1)
        row[0].set(xscale="log", ylabel="1/eps_B at eps_S = 0.5", title=label_text(labels))
        row[1].set(xscale="log", ylabel="epochs to converge", title=f"{label_text(labels)} (dotted: scratch)")
    for ax in axes[-1]:
        ax.set_xlabel("pretraining jets")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def tsne_map(out, cell, n_jets, seed=0):
    """2-D t-SNE of a fine-tuning cell's test_repr.npz (cached in tsne/<cell>.npz), or None."""
    src, cache = Path(out) / cell / "test_repr.npz", Path(out) / "tsne" / (Path(cell).name + ".npz")
    if cache.exists():
        d = np.load(cache)
        return d["xy"], d["y"]
    if not src.exists():
        return None
    from sklearn.manifold import TSNE
    d = np.load(src)
    z, y = d["z"][:n_jets], d["y"][:n_jets]
    perplexity = min(30.0, max(1.0, (len(z) - 1) / 3))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z.astype(np.float64))
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
            names = json.loads((Path(args.out) / r["cell"] / "results.json").read_text()).get("classes")
            for c in np.unique(y):
                ax.scatter(*xy[y == c].T, s=3, alpha=0.6, label=names[c] if names else f"class {c}")
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
    meta = {k: v for k, v in vars(args).items() if k not in ("sizes", "label_counts", "extra")}
    study = dict(args=meta, git=common.git_hash(), versions=common.versions(), rows=rows)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1, default=str))
    os.replace(tmp, out / "study.json")
    write_markdown(args, rows, out / "study.md")
    plot_labels(args, rows, out / "labels.png")
    if len(args.sizes) > 1:
        plot_sizes(args, rows, out / "pretrain_size.png")
    made = args.tsne_jets > 0 and plot_tsne(args, rows, out / "tsne.png")
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, labels.png"
          + (", pretrain_size.png" if len(args.sizes) > 1 else "")
          + (", tsne.png" if made else " (no t-SNE: --tsne-jets 0, or a cell without test_repr.npz)"))
    return study


def main(args):
    Path(args.out).mkdir(parents=True, exist_ok=True)
    n_pre = len(args.variants) * len(args.sizes)
    print(f"study: {len(args.variants)} model(s) x {len(args.sizes)} size(s) = {n_pre} pretraining runs, "
          f"then {len(args.label_counts)} label count(s) x {args.seeds} seed(s) of fine-tuning; "
          f"out {args.out}, git {common.git_hash()}")
    rows = run_study(args)
    return report(args, rows)


if __name__ == "__main__":
    main(get_args())
