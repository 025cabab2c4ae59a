"""Training-step throughput of our Encoder at ParT size, and of weaver-core's ParticleTransformer
on the same batches when `weaver` (pip install weaver-core; not a dependency) is importable.

One step = forward, cross-entropy over 10 classes, backward, AdamW. Synthetic jets: 15-100 real
particles out of 128, pT-sorted, with (px, py, pz, E) from random (pT, eta, phi) around the jet
axis and 17 random input features. Our batches are cut to the longest jet rounded up to 16
(trim_batch, on the host as a data loader would); weaver gets the full 128 and trims inside its
forward (its SequenceTrimmer: in training it keeps a random 90-100% quantile of the lengths).
Untimed warm-up steps first (compilation), then timed steps between cuda synchronize calls.

GPU:  python bench_train.py                       (bf16 autocast, batch 512, eager + compiled)
CPU:  python bench_train.py --device cpu --batch-size 16 --steps 3      (fp32, eager only)
"""
import argparse
import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

N_CLASSES = 10


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="jets per step (default 512 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing, compilation included (default 10 on CUDA, 5 on "
                        "CPU: weaver's trimmer starts cutting padding only after 5 steps)")
    p.add_argument("--n-max", type=int, default=128, help="padded particles per jet")
    p.add_argument("--preset", choices=list(common.ENCODER_PRESETS), default="part",
                   help="our encoder's size (weaver's model always has ParT's size)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile'd models (default: on with CUDA, off on CPU)")
    p.add_argument("--no-weaver", action="store_true", help="skip weaver even when it is installed")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --- synthetic batches --------------------------------------------------------------
def make_batch(batch_size, n_max, in_dim, g):
    """x (B, N, in_dim), p4 (B, N, 4), valid (B, N), y (B,): valid-first, pT-sorted, zero padding."""
    n = torch.randint(15, 101, (batch_size,), generator=g)
    valid = torch.arange(n_max)[None] < n[:, None]
    pt = torch.distributions.Exponential(torch.tensor(1.0)).sample((batch_size, n_max))
    pt = (pt / pt.sum(1, keepdim=True) * 600.0).sort(dim=1, descending=True).values  # GeV
    eta, phi = 0.2 * torch.randn(batch_size, n_max, generator=g), 0.2 * torch.randn(batch_size, n_max, generator=g)
    p4 = torch.stack([pt * phi.cos(), pt * phi.sin(), pt * eta.sinh(), pt * eta.cosh()], dim=-1)
    p4 = p4 * valid[..., None]
    x = torch.randn(batch_size, n_max, in_dim, generator=g) * valid[..., None]
    y = torch.randint(0, N_CLASSES, (batch_size,), generator=g)
    return x, p4, valid, y


class Classifier(nn.Module):
    """Our encoder + a linear head on the class-attention output (ParT's layout)."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.head = common.Encoder(cfg), nn.Linear(cfg.dim, N_CLASSES)

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
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} | {name} | batch {args.batch_size} x {args.n_max} | "
          f"{'bf16 autocast' if cuda else 'fp32'} | steps {args.warmup} warm-up + {args.steps} timed")

    cfg = dataclasses.replace(common.ENCODER_PRESETS[args.preset], in_dim=17)  # "full" features
    g = torch.Generator().manual_seed(args.seed)
    batches = [make_batch(args.batch_size, args.n_max, cfg.in_dim, g) for _ in range(4)]
    # ours: trimmed on the host before the copy, as a data loader would
    ours = []
    for x, p4, valid, y in batches:
        valid, x, p4 = common.trim_batch(valid, x, p4)
        ours.append([t.to(device) for t in (x, valid, p4, y)])
    print("our trimmed lengths:", [b[1].shape[1] for b in ours])
    runs = [("nanojet Encoder", f"{args.preset}", lambda: Classifier(cfg), ours,
             lambda b: ((b[0], b[1], b[2]), b[3]))]

    try:
        if args.no_weaver:
            raise ImportError
        from weaver.nn.model.ParticleTransformer import ParticleTransformer
    except ImportError:
        print("weaver not importable (pip install weaver-core) or --no-weaver: timing ours only")
    else:
        theirs = [[t.to(device) for t in (x.transpose(1, 2).contiguous(), p4.transpose(1, 2).contiguous(),
                                          valid[:, None].float(), y)] for x, p4, valid, y in batches]
        # ParT's published configuration (2,143,486 parameters with 17 inputs and 10 classes)
        make_weaver = lambda: ParticleTransformer(  # noqa: E731
            17, N_CLASSES, pair_input_dim=4, use_pre_activation_pair=False, embed_dims=(128, 512, 128),
            pair_embed_dims=(64, 64, 64), num_heads=8, num_layers=8, num_cls_layers=2, fc_params=[])
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
            model = (torch.compile(raw, dynamic=False if data is ours else None) if compiled else raw)
            sec = time_steps(model, data, make_inputs, args, device, ctx)
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((label, size, n_params, compiled, args.batch_size / sec, 1e3 * sec, mem))
            print(f"  {label} compile={compiled}: {args.batch_size / sec:,.0f} jets/s")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()

    print(f"\n{'model':<16} {'size':<12} {'params':>10} {'compile':>8} {'jets/s':>10} {'ms/step':>9} {'peak GiB':>9}")
    for label, size, n, c, jps, ms, mem in rows:
        print(f"{label:<16} {size:<12} {n:>10,} {str(c):>8} {jps:>10,.0f} {ms:>9.1f} {mem:>9.2f}")
    return rows


if __name__ == "__main__":
    main(get_args())
