"""Generation check of a diffmae checkpoint: does the diffusion decoder sample hidden particles
that belong to *their* jet?

For val jets, hide particles with the run's masking, and sample each decoded particle from its
decoder output (ancestral DDPM on the schedule respaced to `--sample-steps`, in the standardised
units the model was trained in, then mapped back to input units). Two checks:
1. Marginals: per-feature Wasserstein-1 between the sampled and the true particles, next to the
   same distance between true particles of other jets. A generator that ignores its jet and draws
   from the overall particle distribution passes this check too.
2. Conditioning control: the same sampler, with the same noise, fed another jet's context (the
   encoder output of another val jet of the batch, with this particle's query). Per particle, the
   distance to the truth (RMS over standardised features). The generator is conditional only if the
   own context brings the samples closer to the truth than the shuffled one by more than two
   standard errors of the paired difference. Val batches hold jets of one class after another, so
   the other jet is mostly of the same class: the control asks for more than the class.

    python -m scripts.bench_gen --ckpt out/diffmae.pt --n-eval 2000 [--plot gen_check.png]
"""
import argparse
import math

import numpy as np
import torch

import common
import diffmae


OLD_RUNS = dict(head="diffusion", query_rank="global", frame="jet")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by diffmae.py")
    p.add_argument("--data-dir", default=None, help="val data folder (None: the run's)")
    p.add_argument("--n-eval", type=common.positive_int, default=2000, help="val jets to check")
    p.add_argument("--batch-size", type=common.positive_int, default=256, help="jets per batch")
    p.add_argument("--sample-steps", type=common.positive_int, default=100,
                   help="respaced DDPM steps")
    p.add_argument("--sample-temperature", type=common.nonneg_float, default=1.0,
                   help="scales the noise added at each step (not the start)")
    p.add_argument("--sample-clip", type=common.nonneg_float, default=5.0,
                   help="clamp the predicted x0 to +-this in input units (ParT's recipe clips "
                        "to +-5); 0: off")
    p.add_argument("--seed", type=common.nonneg_int, default=0,
                   help="seed of the masks and the sampler noise")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write histograms of four features")
    return p.parse_args(argv)


@torch.no_grad()
def ddpm_sample(net, z, n_feat, alpha_bar, steps=100, temperature=1.0, gen=None, lo=None, hi=None):
    """Ancestral DDPM on the schedule respaced to `steps`; temperature scales only the added noise.
    z (..., C) -> samples (..., n_feat). Noise is drawn on CPU from `gen`. lo, hi: clamp the
    predicted x0 at every step; early steps divide by sqrt(alpha_bar) ~ 1e-4, so a poorly trained
    predictor would otherwise blow up (as image DDPMs clip to the pixel range)."""
    ts = torch.linspace(0, len(alpha_bar) - 1, steps).round().long()
    ab = alpha_bar.cpu().double()[ts]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    randn = lambda: torch.randn(*z.shape[:-1], n_feat, generator=gen).to(z.device)  # noqa: E731
    x = randn()
    for i in reversed(range(steps)):
        eps = net(x, ts[i].to(z.device).expand(x.shape[:-1]), z)
        x0 = (x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        x0 = x0.clamp(lo, hi) if lo is not None else x0
        mean = (ab_prev[i].sqrt() * beta[i] * x0
                + (1 - beta[i]).sqrt() * (1 - ab_prev[i]) * x) / (1 - ab[i])
        x = mean.float()
        if i > 0:
            sigma = float((beta[i] * (1 - ab_prev[i]) / (1 - ab[i])).sqrt())
            x = x + temperature * sigma * randn()
    return x


def sample(model, z, gen, steps=100, temperature=1.0, clip=5.0):
    """Hidden particles (M, F) in input units from their decoder outputs z (M, C): the model
    diffuses standardised features, so the clip bounds are mapped into those units and the
    samples back."""
    mean, std = model.t_mean, model.t_std
    lo, hi = ((-clip - mean) / std, (clip - mean) / std) if clip else (None, None)
    x = ddpm_sample(model.diff, z.float(), len(mean), model.alpha_bar, steps, temperature, gen,
                    lo, hi)
    return x * std + mean


def w1(a, b):
    """1-D Wasserstein-1 distance between two equally sized samples."""
    return float((a.sort()[0] - b.sort()[0]).abs().mean())


def compare(true, fake, control, names, scale, seed=0):
    """true, fake, control (M, F): the hidden particles, samples from their own jet's context and
    from another jet's. scale (F,): the feature stds the distances are measured in. Returns a
    dict: per-feature W1 (sampled, control and other particles vs the truth) and the
    conditioning test."""
    order = torch.randperm(len(true), generator=common.generator(seed, "bench_gen halves"))
    true, fake, control = true[order], fake[order], control[order]
    h = len(true) // 2
    out = {}
    for f, name in enumerate(names):
        out[f"w1_{name}"] = w1(fake[:h, f], true[:h, f])
        out[f"w1_control_{name}"] = w1(control[:h, f], true[:h, f])
        out[f"w1_other_{name}"] = w1(true[h:2 * h, f], true[:h, f])   # other jets' true particles
    dist = lambda x: (((x - true) / scale) ** 2).mean(1).sqrt()       # noqa: E731  (M,)
    own, ctl = dist(fake), dist(control)
    gap = ctl - own
    se = float(gap.std() / math.sqrt(len(gap)))
    out.update(dist_own=float(own.mean()), dist_control=float(ctl.mean()), gap=float(gap.mean()),
               gap_se=se,
               conditional=bool(gap.mean() > 2 * se), n=len(true))
    return out


def report(r, names):
    print(f"generation check on {r['n']} hidden val particles")
    print(f"  {'feature':16s} {'W1(sampled)':>12s} {'W1(control)':>12s} "
          f"{'W1(other jets)':>15s}   (vs the truth)")
    for name in names:
        print(f"  {name:16s} {r[f'w1_{name}']:12.4f} {r[f'w1_control_{name}']:12.4f} "
              f"{r[f'w1_other_{name}']:15.4f}")
    print(f"  per-particle distance to the truth (RMS over standardised features): own context "
          f"{r['dist_own']:.4f}, another jet's context {r['dist_control']:.4f}; "
          f"gap {r['gap']:.4f} +- {r['gap_se']:.4f}")
    print("  conditional: " + (
        "yes, the own context beats the control by more than 2 standard errors"
        if r["conditional"] else "NO, the samples are no closer to their own jet's truth"))


@torch.no_grad()
def main(argv=None):
    a = get_args(argv)
    ckpt = common.load_checkpoint(a.ckpt)
    if ckpt["method"] != "diffmae":
        raise SystemExit(f"--ckpt {a.ckpt}: a {ckpt['method']} checkpoint; bench_gen.py checks "
                         "diffmae's")
    # checkpoints from before these flags: the behaviour they had then
    run = argparse.Namespace(**{**OLD_RUNS, **ckpt["args"]})
    if run.head != "diffusion":
        raise SystemExit(f"--ckpt {a.ckpt}: a --head {run.head} run has no generator to check; "
                         "scripts/bench_gen.py needs a --head diffusion checkpoint")
    use_cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model = diffmae.DiffMAE(ckpt["encoder_config"], run)
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    names = common.FEATURE_NAMES[run.features]
    stream = common.JetStream(run.data, "val", path=a.data_dir or run.data_dir, n_jets=a.n_eval,
                              n_max=run.n_max, features=run.features, batch_size=a.batch_size,
                              seed=a.seed, shuffle=False, drop_last=False)
    true, fake, control = [], [], []
    for i, b in enumerate(common.loader(stream, torch.device("cpu"))):
        batch = diffmae.make_batch(b["x"], b["p4"], b["valid"], run, device, "bench_gen",
                                   a.seed, i)
        perm = torch.randperm(len(b["x"]), generator=common.generator(a.seed, "bench_gen jets", i))
        other = torch.empty_like(perm)
        other[perm] = perm.roll(1)                       # every jet gets another jet's context
        other = other.to(device)
        sel = batch["pred_valid"]
        z = model.condition(batch["x_vis"], batch["vis_valid"], batch["pred_rank"])[sel]
        z_ctl = model.condition(batch["x_vis"][other], batch["vis_valid"][other],
                                batch["pred_rank"])[sel]
        true.append(batch["x_pred"][sel].float().cpu())
        for out, cond in ((fake, z), (control, z_ctl)):  # the same noise for both: paired
            gen = common.generator(a.seed, "bench_gen noise", i)
            drawn = sample(model, cond, gen, a.sample_steps, a.sample_temperature, a.sample_clip)
            out.append(drawn.cpu())
    true, fake, control = torch.cat(true), torch.cat(fake), torch.cat(control)
    r = compare(true, fake, control, names, model.t_std.cpu(), a.seed)
    report(r, names)
    if a.plot:
        plot(a.plot, true, fake, control, names)
    return r


def plot(path, true, fake, control, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    show = [names.index(n) for n in ("pt_log", "deltaR", "deta", "dphi")]
    fig, axes = plt.subplots(1, len(show), figsize=(4 * len(show), 3.2))
    for ax, f in zip(axes, show):
        lo, hi = np.quantile(true[:, f].numpy(), [0.005, 0.995])
        kw = dict(bins=40, range=(lo, hi) if hi > lo else None, histtype="step", density=True)
        for x, label in ((true, "true"), (fake, "sampled"), (control, "another jet's context")):
            ax.hist(x[:, f].numpy(), label=label, **kw)
        ax.set_xlabel(names[f])
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
