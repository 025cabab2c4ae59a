"""GPU check: the GPU path end to end, in one command of about 5 minutes on one H100.

Each section runs in its own process under a time cap, writes <out>/<section>.json and
<section>.log as it goes (a run cut short still reports what it finished), and the table comes
last. Sections:
  data      jets generated with jetgen.py on every core (QCD and top, Top Tagging window), or
            --data-dir
  jjepa, jetclr, mpm, diffmae, finetune
            the script's own train() (finetune.py: --scratch --size part --mode finetune) at its
            default size, with --compile and bf16 autocast (CUDA's defaults), --workers loader
            processes and one length bucket (--n-max 64: a batch of 512 generated jets always
            holds one of more than 48 particles). Untimed warm-up steps (compilation), then timed
            steps split into "data" (waiting for the batch, masks, augmentations) and "step"
            (forward, backward, optimizer) by bench_train.StepClock; jets/s overall and of the
            step alone, peak GPU memory, the graphs dynamo compiled and its graph breaks; then
            the loader alone (the method's own stream and worker transform, no model): its
            feed rate in jets/s, to read beside the step rate.
  part      our supervised ParT-size step against weaver-core's ParticleTransformer on the same
            synthetic batches (bench_train.main: eager and compiled), as a ratio. Skipped with
            one line when weaver is not importable.

GPU machine (no internet): bring weaver-core's wheel with the others. Here, after
`bash ../shared/device/wheels.sh`:
    python -m pip download --no-deps --only-binary=:all: --dest .whl weaver-core
then, there:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site; python3 -m scripts.gpu_check --out $OUT/gpu_check
CPU smoke test of the script itself (tiny models, a few steps, the sections in one process):
    python -m scripts.gpu_check --device cpu --out /tmp/gpu_smoke
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the method scripts and common.py stand at the top level

SECTIONS = ["data", "jjepa", "jetclr", "mpm", "diffmae", "finetune", "part"]
METHODS = ["jjepa", "jetclr", "mpm", "diffmae"]
# seconds per section on a GPU: compilation takes most of a method's share
CAPS = dict(data=75, jjepa=45, jetclr=35, mpm=40, diffmae=35, finetune=40, part=90)
# the CPU smoke: models small enough that a few steps take a second
TINY = dict(
    jjepa=["--dim", "16", "--depth", "1", "--heads", "2", "--pred-dim", "16", "--pred-depth", "1"],
    jetclr=["--dim", "16", "--depth", "1", "--heads", "2"],
    mpm=["--dim", "16", "--depth", "1", "--heads", "2", "--n-registers", "1", "--dec-dim", "16",
         "--dec-depth", "1", "--dec-heads", "2", "--k", "8", "--kmeans-jets", "64",
         "--kmeans-steps", "2"],
    diffmae=["--size", "tiny", "--diff-mul", "2"],
    finetune=[],
)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu_check", help="folder of the results and logs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the smoke test of this script (tiny models, fp32, no compile)")
    p.add_argument("--data-dir", default=None,
                   help="a scripts/jetgen.py folder to use instead of generating one")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated sections to run, in this order")
    p.add_argument("--cap-scale", type=float, default=1.0,
                   help="multiply every section's time cap (a slower GPU)")
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the sections in this process, without time caps (None: on for "
                        "--device cpu, where each process would pay the imports again)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in-process
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.in_process is None:
        args.in_process = cpu
    # one place for the sizes of both modes: (GPU, CPU smoke)
    args.batch_size = 16 if cpu else 512
    args.warmup = 1 if cpu else 8
    args.steps = 1 if cpu else 20
    args.n_max = 32 if cpu else 64
    args.n_eval = 16 if cpu else 2048
    args.workers = 1 if cpu else 8
    args.jets_per_class = 40 if cpu else 3000
    args.loader_batches = 4 if cpu else 60
    return args


def data_dir(args):
    return Path(args.data_dir) if args.data_dir else Path(args.out) / "data"


def write(args, name, result):
    path = Path(args.out) / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


# --- sections (each runs in its own process) ------------------------------------------------


def section_data(args):
    if args.data_dir:
        return dict(data_dir=args.data_dir, generated=0)
    from scripts import jetgen
    t0 = time.time()
    jetgen.generate(data_dir(args), classes=("QCD", "Tbqq"), jets_per_class=args.jets_per_class,
                    seed=0, workers=os.cpu_count(), preset="toptagging", progress=False)
    seconds = time.time() - t0
    n = 2 * args.jets_per_class
    return dict(data_dir=str(data_dir(args)), generated=n, seconds=seconds, jets_per_s=n / seconds)


def timed_train(args, name, run):
    """Run `run()` (a script's training) under bench_train.StepClock; the figures of the steps
    after the warm-up."""
    import torch
    from torch._dynamo.utils import counters
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from scripts import bench_train
    cuda = args.device == "cuda"
    clock = bench_train.StepClock(torch.cuda.synchronize if cuda else (lambda: None))
    hooks = [register_module_forward_pre_hook(clock.forward_pre),
             register_optimizer_step_post_hook(clock.step_post)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    timed = range(args.warmup, min(args.warmup + args.steps, len(clock.ends)))
    if len(timed) == 0:
        raise SystemExit(f"{name}: {len(clock.ends)} optimizer steps ran, none after the "
                         f"{args.warmup} warm-up steps")
    data = sum(clock.starts[i] - clock.ends[i - 1] for i in timed) / len(timed)
    step = sum(clock.ends[i] - clock.starts[i] for i in timed) / len(timed)
    return dict(steps=len(timed), batch=args.batch_size, data_ms=1e3 * data, step_ms=1e3 * step,
                jets_per_s=args.batch_size / (data + step), step_jets_per_s=args.batch_size / step,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()))


def common_flags(args, name):
    cpu = args.device == "cpu"
    return ["--data", "pythia", "--data-dir", str(data_dir(args)), "--n-max", str(args.n_max),
            "--batch-size", str(args.batch_size), "--steps", str(args.warmup + args.steps),
            "--n-eval", str(args.n_eval), "--eval-every", str(10 ** 9),
            "--workers", str(args.workers), "--device", args.device, "--seed", "0",
            "--log-every", str(10 ** 6), "--out", str(Path(args.out) / name), "--overwrite",
            "--no-compile" if cpu else "--compile", *(TINY[name] if cpu else [])]


def loader_rate(args, name, stream):
    """Jets/s the loader delivers alone (after its first batch: worker start-up left out)."""
    import torch

    import common
    device = torch.device(args.device)
    n, t0 = 0, None
    for batch in common.loader(stream, device):
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(batch["y"])
        if n >= args.loader_batches * args.batch_size:
            break
    return n / (time.perf_counter() - t0) if n else float("nan")


def section_method(args, name):
    import importlib

    import common
    module = importlib.import_module(name)
    method_args = module.get_args(common_flags(args, name))
    result = timed_train(args, name, lambda: module.train(method_args))
    write(args, name, result)  # the loader's figure follows; a cut run keeps this much
    ckpt = common.load_checkpoint(Path(args.out) / name / f"{name}.pt")
    cfg = ckpt["encoder_config"]
    run_args = ckpt["args"]
    stream = common.JetStream("pythia", "train", path=data_dir(args), n_max=args.n_max,
                              features=run_args.get("features") or "kin",
                              batch_size=args.batch_size, workers=args.workers,
                              transform=module.batch_transform(cfg), pad=module.PAD)
    result["loader_jets_per_s"] = loader_rate(args, name, stream)
    return result


def section_finetune(args):
    """GPU: a ParT-size encoder from scratch; CPU smoke: the jetclr section's tiny encoder."""
    import finetune
    flags = common_flags(args, "finetune") + ["--mode", "finetune", "--label-frac", "1"]
    if args.device == "cuda":
        flags += ["--scratch", "--size", "part"]
    else:
        flags += ["--ckpt", str(Path(args.out) / "jetclr" / "jetclr.pt")]
    return timed_train(args, "finetune", lambda: finetune.main(finetune.get_args(flags)))


def section_part(args):
    from scripts import bench_train
    try:
        import weaver.nn.model.ParticleTransformer  # noqa: F401
        weaver = True
    except ImportError:
        weaver = False
        print("weaver-core is not importable: ParT comparison skipped (its wheel: see "
              "scripts/gpu_check.py's docstring)")
    argv = ["--device", args.device, "--batch-size", str(args.batch_size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--n-max", "128"]
    if args.device == "cpu":  # later flags win: a small encoder, short jets, eager only
        argv += ["--batch-size", "8", "--n-max", "32", "--size", "small", "--no-compile"]
    rows = bench_train.main(bench_train.get_args(argv + ([] if weaver else ["--no-weaver"])))
    keys = ("model", "size", "params", "compiled", "jets_per_s", "ms_per_step", "peak_gib")
    result = dict(rows=[dict(zip(keys, r)) for r in rows], weaver=weaver)
    speed = {(r[0], r[3]): r[4] for r in rows}
    for compiled in (False, True):
        ours = speed.get(("nanojet Encoder", compiled))
        theirs = speed.get(("weaver ParT", compiled))
        if ours and theirs:
            result[f"ratio_{'compiled' if compiled else 'eager'}"] = ours / theirs
    return result


# --- the driver -------------------------------------------------------------------------------


def run_section(args, name):
    """This section in a child process under its cap; its status (ok / failed / cut)."""
    out = Path(args.out)
    if args.in_process:
        return run_in_process(args, name)
    cap = CAPS[name] * args.cap_scale * (3 if args.device == "cpu" else 1)
    cmd = [sys.executable, "-m", "scripts.gpu_check", "--section", name, "--out", str(out),
           "--device", args.device, *(["--data-dir", args.data_dir] if args.data_dir else [])]
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                timeout=cap).returncode
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = f"cut at {cap:.0f} s"
    return dict(status=status, seconds=round(time.time() - t0, 1))


def run_in_process(args, name):
    import contextlib
    import traceback
    t0 = time.time()
    status = "ok"
    with open(Path(args.out) / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            section(argparse.Namespace(**dict(vars(args), section=name)))
        except SystemExit as e:
            print(e.code)
            status = f"failed ({str(e.code)[:40]})"
        except Exception:  # noqa: BLE001  (the traceback goes to the section's log)
            traceback.print_exc()
            status = "failed"
    return dict(status=status, seconds=round(time.time() - t0, 1))


def fmt(value, spec):
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if value is None or value != value else format(value, spec)


def table(args, statuses):
    out = Path(args.out)
    lines = [f"{'section':<9} {'status':<14} {'jets/s':>9} {'step jets/s':>11} "
             f"{'loader jets/s':>13} {'data ms':>8} {'step ms':>8} {'peak GiB':>8} "
             f"{'graphs':>6} {'breaks':>6}"]
    for name in statuses:
        path = out / f"{name}.json"
        r = json.loads(path.read_text()) if path.exists() else {}
        status = statuses[name]["status"]
        if name == "data":
            lines.append(f"{name:<9} {status:<14} {fmt(r.get('jets_per_s'), '9,.0f')} "
                         f"(generated {r.get('generated', '-')} jets in {r.get('data_dir', '-')})")
            continue
        if name == "part":
            for row in r.get("rows", []):
                lines.append(f"{'part':<9} {status:<14} {fmt(row['jets_per_s'], '9,.0f')} "
                             f"{'':>11} {'':>13} {'':>8} {fmt(row['ms_per_step'], '8.1f')} "
                             f"{fmt(row['peak_gib'], '8.2f')}   {row['model']}, "
                             f"compiled {row['compiled']}")
            for k in ("ratio_eager", "ratio_compiled"):
                if k in r:
                    lines.append(f"part: ours / weaver jets/s ({k[6:]}) = {r[k]:.2f}")
            if r and not r.get("weaver"):
                lines.append("part: weaver-core not installed, no ratio")
            if not r:
                lines.append(f"{name:<9} {status:<14}")
            continue
        lines.append(f"{name:<9} {status:<14} {fmt(r.get('jets_per_s'), '9,.0f')} "
                     f"{fmt(r.get('step_jets_per_s'), '11,.0f')} "
                     f"{fmt(r.get('loader_jets_per_s'), '13,.0f')} "
                     f"{fmt(r.get('data_ms'), '8.1f')} "
                     f"{fmt(r.get('step_ms'), '8.1f')} {fmt(r.get('peak_gib'), '8.2f')} "
                     f"{fmt(r.get('graphs'), '6d')} {fmt(r.get('graph_breaks'), '6d')}")
    return "\n".join(lines)


def main(args):
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; --device cpu runs the smoke test")
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, device=torch.cuda.get_device_name()
               if args.device == "cuda" else "cpu", cpus=os.cpu_count(), argv=sys.argv,
               batch=args.batch_size, n_max=args.n_max, warmup=args.warmup, steps=args.steps,
               workers=args.workers)
    import common
    env["git"] = common.git_hash()
    write(args, "env", env)
    print(f"gpu_check: {env['device']}, torch {env['torch']}, git {env['git']}, {env['date']}; "
          f"batch {args.batch_size}, n_max {args.n_max}, {args.warmup} warm-up + {args.steps} "
          f"timed steps, {args.workers} loader workers; logs in {out}", flush=True)
    statuses = {}
    for name in args.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--sections: unknown section {name!r}; choose from {SECTIONS}")
        statuses[name] = run_section(args, name)
        write(args, "status", statuses)
        print(f"  {name}: {statuses[name]['status']} in {statuses[name]['seconds']} s",
              flush=True)
    text = table(args, statuses)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    return statuses


def section(args):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.section == "data":
        result = section_data(args)
    elif args.section in METHODS:
        result = section_method(args, args.section)
    elif args.section == "finetune":
        result = section_finetune(args)
    else:
        result = section_part(args)
    write(args, args.section, result)


if __name__ == "__main__":
    a = get_args()
    if a.section:
        section(a)
    else:
        main(a)
