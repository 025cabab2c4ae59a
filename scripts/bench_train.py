"""Training-step throughput of our Encoder at ParT size, and of weaver-core's ParticleTransformer
on the same batches when `weaver` (pip install weaver-core; not a dependency) is importable.

One step = forward, cross-entropy over 10 classes, backward, AdamW. Synthetic jets: 15-100 real
particles out of 128, pT-sorted, with (px, py, pz, E) from random (pT, eta, phi) around the jet
axis and 17 random input features. Our batches are cut to the longest jet rounded up to 16
(trim_batch, on the host as a data loader would); weaver gets the full 128 and trims inside its
forward (its SequenceTrimmer: in training it keeps a random 90-100% quantile of the lengths).
Untimed warm-up steps first (compilation), then timed steps between cuda synchronize calls.

GPU:  python -m scripts.bench_train          (bf16 autocast, batch 512, eager + compiled)
CPU:  python -m scripts.bench_train --device cpu --batch-size 16 --steps 3  (fp32, eager only)

--method M times one method's own training loop instead (jjepa, jetclr, mpm, diffmae: the
script's train() on real jets, in this process). Global hooks on every module's forward and every
optimizer step split each step into "data" (from the end of the previous optimizer step to the
model's first forward call: batch, masks, augmentations, noise; for jjepa also the EMA update of
the previous step) and "step" (forward, backward, clipping, optimizer step). It replaces the
per-phase timers and --bench / --profile flags that used to live in the method scripts:
  python -m scripts.bench_train --method jetclr --data-dir data/pythia10 --device cpu \
      --batch-size 64 --steps 5 --method-args "--dim 32 --depth 2"
  python -m scripts.bench_train --method diffmae --data jetclass --batch-size 512 --steps 50 \
      --method-args "--size 8m --compile"
"""
import argparse
import contextlib
import dataclasses
import io
import shlex
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

import common
import diffmae
import jetclr
import jjepa
import mpm

N_CLASSES = 10
METHODS = {"jjepa": jjepa, "jetclr": jetclr, "mpm": mpm, "diffmae": diffmae}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="jets per step (None: 512 on CUDA, 16 on CPU; --method: 64)")
    p.add_argument("--steps", type=common.positive_int, default=None,
                   help="timed steps (None: 50 on CUDA, 3 on CPU; --method: 5)")
    p.add_argument("--warmup", type=common.nonneg_int, default=None,
                   help="untimed steps before timing, compilation included (None: 10 on CUDA, "
                        "5 on CPU: weaver's trimmer starts cutting padding only after 5 steps; "
                        "--method: 2)")
    p.add_argument("--n-max", type=common.positive_int, default=128,
                   help="padded particles per jet")
    p.add_argument("--size", choices=list(common.ENCODER_PRESETS), default="part",
                   help="our encoder's size (weaver's model always has ParT's size)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd models (None: on with CUDA, off on CPU)")
    p.add_argument("--no-weaver", action="store_true",
                   help="skip weaver even when it is installed")
    p.add_argument("--seed", type=common.nonneg_int, default=0,
                   help="seed of the batches and weights")
    g = p.add_argument_group("--method: one method's training loop on real jets")
    g.add_argument("--method", choices=list(METHODS), default=None,
                   help="time this method script's train() (data vs step) instead of the "
                        "synthetic Encoder")
    g.add_argument("--data", choices=["pythia", "jetclass", "toptagging"], default="pythia")
    g.add_argument("--data-dir", default=None, help="data folder (None: data/<data>)")
    g.add_argument("--n-eval", type=common.positive_int, default=256,
                   help="validation/test jets of the run's final evaluation")
    g.add_argument("--method-args", default="",
                   help='extra flags for the method script, e.g. "--dim 32"')
    return p.parse_args(argv)


# --- synthetic batches --------------------------------------------------------------
def make_batch(batch_size, n_max, in_dim, g):
    """x (B, N, in_dim), p4 (B, N, 4), valid (B, N), y (B,): valid-first, pT-sorted, zero
    padding."""
    n = torch.randint(15, 101, (batch_size,), generator=g)
    valid = torch.arange(n_max)[None] < n[:, None]
    pt = torch.distributions.Exponential(torch.tensor(1.0)).sample((batch_size, n_max))
    pt = (pt / pt.sum(1, keepdim=True) * 600.0).sort(dim=1, descending=True).values  # GeV
    eta = 0.2 * torch.randn(batch_size, n_max, generator=g)
    phi = 0.2 * torch.randn(batch_size, n_max, generator=g)
    p4 = torch.stack([pt * phi.cos(), pt * phi.sin(), pt * eta.sinh(), pt * eta.cosh()], dim=-1)
    p4 = p4 * valid[..., None]
    x = torch.randn(batch_size, n_max, in_dim, generator=g) * valid[..., None]
    y = torch.randint(0, N_CLASSES, (batch_size,), generator=g)
    return x, p4, valid, y


class Classifier(nn.Module):
    """Our encoder + a linear head on the class-attention output (ParT's layout)."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = common.Encoder(cfg)
        self.head = nn.Linear(cfg.dim, N_CLASSES)

    def forward(self, x, valid, p4):
        return self.head(self.encoder(x, valid, p4)[2])


# --- timing -------------------------------------------------------------------------
def time_steps(model, batches, make_inputs, args, device, ctx):
    """Run warm-up + timed steps, cycling through `batches`; returns seconds per step."""
    opt = common.configure_optimizer(model, 1e-3, 0.01, device_type=device.type)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(i):
        inputs, y = make_inputs(batches[i % len(batches)])
        with ctx:
            loss = F.cross_entropy(model(*inputs).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        loss = step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync()
    if not torch.isfinite(loss):
        raise SystemExit(f"bench_train: non-finite loss {loss.item()}")
    return (time.perf_counter() - t0) / args.steps


def main(args):
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    device = torch.device("cuda" if cuda else "cpu")
    args.batch_size = args.batch_size or (512 if cuda else 16)
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 5)
    do_compile = cuda if args.compile is None else args.compile
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
           else torch.autocast("cpu", enabled=False))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | {name} | batch {args.batch_size} x {args.n_max} | "
          f"{'bf16 autocast' if cuda else 'fp32'} | "
          f"steps {args.warmup} warm-up + {args.steps} timed")

    cfg = dataclasses.replace(common.ENCODER_PRESETS[args.size], in_dim=17)  # "full" features
    g = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args.batch_size, args.n_max, cfg.in_dim, g) for _ in range(4)]
    # ours: trimmed on the host before the copy, as a data loader would
    ours = []
    for x, p4, valid, y in batches:
        valid, x, p4 = common.trim_batch(valid, x, p4)
        ours.append([t.to(device) for t in (x, valid, p4, y)])
    print("our trimmed lengths:", [b[1].shape[1] for b in ours])
    runs = [("nanojet Encoder", f"{args.size}", lambda: Classifier(cfg), ours,
             lambda b: ((b[0], b[1], b[2]), b[3]))]

    try:
        if args.no_weaver:
            raise ImportError
        from weaver.nn.model.ParticleTransformer import ParticleTransformer
    except ImportError:
        print("weaver not importable (pip install weaver-core) or --no-weaver: timing ours only")
    else:
        theirs = [[t.to(device) for t in (x.transpose(1, 2).contiguous(),
                                          p4.transpose(1, 2).contiguous(),
                                          valid[:, None].float(), y)]
                  for x, p4, valid, y in batches]
        # ParT's published configuration (2,143,486 parameters with 17 inputs and 10 classes)
        make_weaver = lambda: ParticleTransformer(  # noqa: E731
            17, N_CLASSES, pair_input_dim=4, use_pre_activation_pair=False,
            embed_dims=(128, 512, 128), pair_embed_dims=(64, 64, 64), num_heads=8, num_layers=8,
            num_cls_layers=2, fc_params=[])
        runs.append(("weaver ParT", "0.5 default", make_weaver, theirs,
                     lambda b: ((b[0], b[1], b[2]), b[3])))

    rows = []
    for label, size, build, data, make_inputs in runs:
        for compiled in ([False, True] if do_compile else [False]):
            torch.manual_seed(args.seed)
            raw = build().to(device).train()
            n_params = sum(p.numel() for p in raw.parameters())
            # ours: one static graph per length bucket; weaver trims to a different length every
            # step inside forward, so it needs dynamic shapes (torch's default after a recompile)
            model = (torch.compile(raw, dynamic=False if data is ours else None) if compiled
                     else raw)
            sec = time_steps(model, data, make_inputs, args, device, ctx)
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((label, size, n_params, compiled, args.batch_size / sec, 1e3 * sec, mem))
            print(f"  {label} compile={compiled}: {args.batch_size / sec:,.0f} jets/s")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()

    print(f"\n{'model':<16} {'size':<12} {'params':>10} {'compile':>8} {'jets/s':>10} "
          f"{'ms/step':>9} {'peak GiB':>9}")
    for label, size, n, c, jps, ms, mem in rows:
        print(f"{label:<16} {size:<12} {n:>10,} {str(c):>8} {jps:>10,.0f} {ms:>9.1f} {mem:>9.2f}")
    return rows


# --- one method's own training loop --------------------------------------------------------------
class StepClock:
    """Timestamps from global hooks: the first module forward after each optimizer step (the
    step's compute begins) and the end of each optimizer step (wall and process CPU time)."""

    def __init__(self, sync):
        self.sync = sync
        self.starts = []
        self.ends = []
        self.cpu = []
        self.waiting = True

    def forward_pre(self, module, inputs):
        if self.waiting:
            self.sync()
            self.starts.append(time.perf_counter())
            self.waiting = False

    def step_post(self, optimizer, args, kwargs):
        self.sync()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.waiting = True


def bench_method(args):
    """Run the method's train() for warm-up + timed steps (one epoch of exactly that many batches,
    evaluation only at its end) and split the timed steps into data and step time."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    # + 1: the last step is followed by the final evaluation
    n_steps = args.warmup + args.steps + 1
    module = METHODS[args.method]
    with tempfile.TemporaryDirectory() as out:
        argv = ["--data", args.data, *(["--data-dir", args.data_dir] if args.data_dir else []),
                "--n-jets", str(n_steps * args.batch_size), "--epochs", "1",
                "--batch-size", str(args.batch_size), "--n-eval", str(args.n_eval),
                "--eval-every", str(10 ** 9), "--device", args.device,
                "--seed", str(args.seed), "--out", out, *shlex.split(args.method_args)]
        run_args = module.get_args(argv)
        clock = StepClock(torch.cuda.synchronize if cuda else (lambda: None))
        hooks = [register_module_forward_pre_hook(clock.forward_pre),
                 register_optimizer_step_post_hook(clock.step_post)]
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                module.train(run_args)
        except BaseException:
            print(log.getvalue()[-3000:])
            raise
        finally:
            for h in hooks:
                h.remove()
    # step i's data time: previous step's end -> its first forward; step time: -> its end
    timed = range(args.warmup, min(args.warmup + args.steps, len(clock.ends) - 1))
    if args.warmup < 1 or len(timed) == 0:
        raise SystemExit(f"bench_train: {len(clock.ends)} optimizer steps ran; need "
                         f"--warmup >= 1 and more jets "
                         f"(--n-jets is set to {n_steps * args.batch_size})")
    data = sum(clock.starts[i] - clock.ends[i - 1] for i in timed)
    step = sum(clock.ends[i] - clock.starts[i] for i in timed)
    cpu = clock.cpu[timed[-1]] - clock.cpu[timed[0] - 1]
    jets = len(timed) * args.batch_size
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.method} {args.method_args!r} | {name} | batch {args.batch_size} | "
          f"{args.warmup} warm-up + {len(timed)} timed steps")
    print(f"  {jets / (data + step):,.0f} jets/s; "
          f"{jets / max(cpu, 1e-9):,.0f} jets per CPU-second (this process"
          f"{'; loader workers not counted' if '--workers' in args.method_args else ''})")
    print(f"  per step: data {1e3 * data / len(timed):.1f} ms "
          f"({100 * data / (data + step):.0f}%), step {1e3 * step / len(timed):.1f} ms "
          f"({100 * step / (data + step):.0f}%)")
    return dict(jets_per_s=jets / (data + step), jets_per_cpu_s=jets / max(cpu, 1e-9),
                data_ms=1e3 * data / len(timed), step_ms=1e3 * step / len(timed))


if __name__ == "__main__":
    a = get_args()
    if a.method:
        a.batch_size = a.batch_size or 64
        a.steps = a.steps or 5
        a.warmup = 2 if a.warmup is None else a.warmup
        bench_method(a)
    else:
        main(a)
