"""DiffMAE: a masked autoencoder for jets whose decoder learns hidden particles by diffusion.

Idea (the seed talk). Hide 12.5% of a jet's particles (`--mask-ratio`); the encoder sees the
rest. A CrossMAE decoder (arXiv 2401.14391) asks, for some hidden particles (`--pred-ratio`: a
fraction of the jet, or `1tok` = one per jet), "what was here?": one query per particle,
cross-attending to the encoder output, never to the other queries. Plain MSE on the features
collapsed to the mean particle in the talk; instead an adaLN MLP conditioned on the decoder
output learns to denoise them (MAR's diffusion loss, arXiv 2406.11838), so the model also
generates hidden particles (bench_gen.py). `--head mse` is the talk's ablation: a linear map of
the decoder output regresses the same standardised targets; at a small CPU budget the two heads
probe and fine-tune alike, and it is the diffusion arm whose jet vectors share one direction
(mean cosine 0.9999 vs 0.62, README). LLaMA-style blocks (RMSNorm, SwiGLU, grouped-query
attention).

Queries. A set has no order for RoPE: the encoder gets no position, and a query names its
particle by an embedding of a rank (`--query-rank`). `global`, the pT rank in the whole jet,
pins the target's pT between its visible neighbours' (part of the task becomes interpolation);
`hidden`, the default (as MPM v2), ranks it among the hidden particles only; `none` gives every
query of a jet the same vector. Linear probe AUC (tiny size, 2 epochs on 4,000 jetgen top/QCD
jets, 3 seeds): hidden 0.9418 +- 0.0011, global 0.9408 +- 0.0021, none 0.9454 +- 0.0015; no
choice beats hidden by 2 standard errors, so it stays, in `--preset paper` too.

Frame (`--frame`). Measured from the jet's axis, the visible particles' deta/dphi give the
hidden ones' pT-weighted centroid, and ParT's relative logs give E_jet (minus the visible
energy: the hidden total). `visible`, the default, recomputes deta, dphi, logptrel, logerel
and deltaR of the visible particles from their own summed 4-vector, and the targets' in the
same frame: the encoder input is a function of the visible particles alone (a test checks it
bitwise). Still open: the number of hidden particles (round(ratio n), from the visible count),
the jet's selection (its pT window bounds the hidden pT sum; the R = 0.8 cone is drawn around
the full axis) and, under `--query-rank global`, the target's pT rank. `jet` is the data
layer's frame (the previous behaviour); there the default `--drop-features` (logptrel, logerel
out of the encoder input, as MPM v2) still closes the E_jet shortcut, not the centroid. Targets
keep every feature, standardised with the mean/std of a bounded sample of targets (raw stds
run from 0.04 to 1.2: against unit noise the angles would barely train). `--features auto` =
"kin" on Top Tagging (no ID / impact parameters there), else "full".

Optimizer. AdamW as MAR (betas 0.9/0.95, wd 0.02, clip 3, constant lr after warm-up) or
`--optimizer schedulefree` (the talk's): schedule-free AdamW, same betas and warm-up
(`--warmup`, or common.warmup_steps' min(100, 5% of the run); the talk warms up for 1,000
steps), then a constant lr. It steps at one point and evaluates at the average: evaluations,
checkpoints and the probe see the average, and resume stays exact.

`--preset paper`, the talk's recipe as far as published: mask 12.5%, one token predicted, all
inputs (drop_features=""; under `--frame jet` this reopens the E_jet shortcut, under the
default visible frame the relative logs carry nothing hidden), 1000-step cosine diffusion, wd
0.02, clip 3, schedule-free AdamW, `--size 8m` (or 1m, 47m: head dim 32, 2 KV groups); the
talk does not say how a query names its particle (the preset: hidden rank); lr, steps, batch
unpublished. The talk's JetClass accuracy, pretrained + fine-tuned vs scratch: 1m 83.2 vs
82.3%, 8m 84.9 vs 83.5%, 47m 85.2 vs 84.2%. Not done: the talk's 21 features (ours: 17,
without the raw four-vector), MAR's learned variance, u-muP (`unit-scaling` lacks GQA,
cross-attention and padding masks).

GPU:  python diffmae.py --data jetclass --preset paper --steps 100000 --batch-size 512 --workers 8
CPU:  OMP_NUM_THREADS=1 python diffmae.py --size 1m --n-jets 1000 --epochs 1 --batch-size 64 \
          --n-max 64
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config ----------------------------------------------------------------------------------
# name: (depth, width, query heads, kv groups, decoder depth, diffusion-MLP width, its depth)
SIZES = {
    "tiny": (2, 32, 4, 2, 1, 64, 2),           # tests and smoke runs
    "1m": (4, 128, 4, 2, 2, 256, 3),           # the talk's sizes (encoder parameters), head dim 32
    "8m": (8, 256, 8, 2, 4, 512, 3),
    "47m": (12, 512, 16, 2, 4, 1024, 3),       # diffusion MLP = MAR-L's 3 x 1024
}
# drop_features="": every input, as the talk; see the docstring for what it reopens under
# --frame jet (nothing under the default visible frame)
PRESETS = {"paper": dict(size="8m", drop_features="", mask_ratio=0.125, pred_ratio="1tok",
                         diff_steps=1000, diff_mul=4, weight_decay=0.02, grad_clip=3.0,
                         optimizer="schedulefree")}


def pred_ratio(text):  # argparse type: "1tok" (one particle per jet) or a fraction in (0, 1]
    return text if text == "1tok" else str(common.fraction(text))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="a named recipe; explicit flags override it. paper: drop_features='' "
                        "(reopens the E_jet shortcut under --frame jet), schedule-free AdamW")
    g.add_argument("--size", default="1m", choices=list(SIZES), help="encoder/decoder/MLP size")
    g.add_argument("--features", choices=["auto", "full", "kin"], default="auto",
                   help="auto: kin on toptagging (no ID, impact parameters), else full")
    g.add_argument("--drop-features", default="logptrel,logerel",
                   help="features left out of the encoder input; the default closes the "
                        "conservation shortcut also under --frame jet")
    g.add_argument("--feature-mix", action="store_true",
                   help="each decoder block reads a mix of all encoder layers")
    g.add_argument("--head", choices=["diffusion", "mse"], default="diffusion",
                   help="diffusion loss (MAR) or plain MSE regression (the talk's ablation)")
    g = p.add_argument_group("masking and loss")
    g.add_argument("--mask-ratio", default=0.125, help="fraction of particles hidden",
                   type=common.number_type(float, lambda v: 0 < v < 1, "a fraction in (0, 1)"))
    g.add_argument("--pred-ratio", type=pred_ratio, default="1tok",
                   help="fraction of the jet decoded, or 1tok")
    g.add_argument("--query-rank", choices=["global", "hidden", "none"], default="hidden",
                   help="what names a query's particle: its pT rank in the jet (leaks its pT "
                        "range), among the hidden particles, or nothing")
    g.add_argument("--frame", choices=["visible", "jet"], default="visible",
                   help="axis of deta/dphi and the relative features, inputs and targets: the "
                        "visible particles' own, or the whole jet's (sees the hidden ones)")
    g.add_argument("--diff-steps", type=common.positive_int, default=1000,
                   help="diffusion steps of the schedule")
    g.add_argument("--diff-mul", type=common.positive_int, default=4,
                   help="(t, noise) draws per token per step")
    g.add_argument("--optimizer", choices=["adamw", "schedulefree"], default="adamw",
                   help="AdamW with MAR's constant lr, or schedule-free AdamW (pip schedulefree)")
    p.set_defaults(lr=1e-3, weight_decay=0.02, grad_clip=3.0, n_eval=2000)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    if args.features == "auto":
        args.features = "kin" if args.data == "toptagging" else "full"
    names = common.FEATURE_NAMES[args.features]
    drop = [f for f in args.drop_features.split(",") if f]
    if set(drop) - set(names) or len(drop) == len(names):
        p.error(f"--drop-features {args.drop_features!r}: give some of {names}, not all")
    # a full jet must show one particle and hide one; shorter jets are dropped (and counted)
    n_hidden = round(args.mask_ratio * args.n_max)
    if not 1 <= n_hidden <= args.n_max - 1:
        raise SystemExit(f"diffmae.py: --mask-ratio {args.mask_ratio} hides {n_hidden} of "
                         f"--n-max {args.n_max} particles; need at least 1 hidden and 1 visible")
    return args


# --- LLaMA-style blocks ----------------------------------------------------------------------
class RMSNorm(nn.RMSNorm):
    """RMSNorm in fp32, cast back, as LLaMA normalises. bf16 autocast leaves rms_norm in the
    input's dtype: the mean square then loses bits, and a bf16 input with the fp32 weight has
    no fused kernel (torch warns at every call). Without autocast, nn.RMSNorm exactly."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class Block(nn.Module):
    """Pre-norm block: grouped-query attention (`heads` query heads share `kv_heads` key/value
    heads), then a SwiGLU feed-forward. cross=True: the queries attend to a memory only."""

    def __init__(self, dim, heads, kv_heads, cross=False):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.hd = dim // heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.norm_mem = RMSNorm(dim) if cross else None
        self.q = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.gate_up = nn.Linear(dim, 8 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def attend(self, x, mem, mask):
        # x (B, Nq, C) queries, mem (B, Nk, C) keys/values, mask (B, 1, 1, Nk) bool, True = attend
        B, Nq, C = x.shape
        q = self.q(x).view(B, Nq, self.heads, self.hd).transpose(1, 2)             # (B, H, Nq, D)
        kv = self.kv(mem).view(B, -1, 2, self.kv_heads, self.hd)
        k, v = kv.permute(2, 0, 3, 1, 4)                                           # (B, G, Nk, D)
        # query head h reads group h // (H / G); K/V are repeated rather than passed with
        # enable_gqa, which takes SDPA's slow math kernel under a padding mask
        k, v = (a.repeat_interleave(self.heads // self.kv_heads, 1) for a in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, Nq, C))

    def forward(self, x, mask, mem=None):
        h = self.norm1(x)
        x = x + self.attend(h, h if mem is None else self.norm_mem(mem), mask)
        gate, up = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def key_mask(valid):
    """(B, N) bool -> (B, 1, 1, N), True = attend; an all-padded row keeps slot 0 (a softmax
    over nothing is NaN)."""
    first = torch.arange(valid.shape[1], device=valid.device) == 0
    return (valid | (first & ~valid.any(1, keepdim=True)))[:, None, None, :]


class Encoder(nn.Module):
    """Permutation-equivariant; reads the features cfg["input_cols"]; jet = mean of the valid
    tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        dim = cfg["dim"]
        self.register_buffer("cols", torch.tensor(cfg["input_cols"]), persistent=False)
        self.embed = nn.Linear(len(cfg["input_cols"]), dim, bias=False)
        self.blocks = nn.ModuleList(Block(dim, cfg["heads"], cfg["kv_heads"])
                                    for _ in range(cfg["depth"]))
        self.norm = RMSNorm(dim)

    def forward(self, x, valid, p4=None, return_layers=False):
        # x (B, N, F) all features, valid (B, N); p4 unused (the features hold the kinematics)
        x = torch.where(valid[..., None], x.index_select(-1, self.cols), 0.0)  # no NaN from pads
        mask = key_mask(valid)
        h = self.embed(x)
        layers = []
        for blk in self.blocks:
            h = blk(h, mask)
            layers.append(h)
        tokens = self.norm(h)                                                        # (B, N, C)
        layers[-1] = tokens     # feature mix reads the normed output, so the norm trains under DDP
        n = valid.sum(1, keepdim=True).clamp(min=1)
        jet = (tokens * valid[..., None]).sum(1) / n                                    # (B, C)
        return (tokens, valid, jet, layers) if return_layers else (tokens, valid, jet)


# the method-module interface (finetune.py, study.py): the encoder reads x and valid; at
# fine-tuning every particle is visible, so the jet frame is the visible frame
PAD = "batch"
build_encoder = Encoder


def encoder_inputs(batch, cfg):
    return dict(x=batch["x"], valid=batch["valid"])


def batch_transform(cfg):
    return None


# --- the method: masking, frame, CrossMAE decoder, diffusion loss ----------------------------
def make_masks(valid, mask_ratio, pred_ratio, gen):
    """Draw the hidden and the decoded particles of each jet (on CPU, from `gen`).
    valid (B, N) bool -> vis_idx (B, Nv), vis_valid (B, Nv), pred_idx (B, P), pred_valid (B, P)
    and hidden_rank (B, P), each decoded particle's rank among its jet's hidden ones. A jet of
    n >= 2 particles hides round(mask_ratio * n), at least 1 and at most n - 1, and decodes
    n_pred of them (1 for 1tok). Indices keep the slots' (pT) order; Nv and P round up to 16
    and 8 (few shapes)."""
    B, N = valid.shape
    n = valid.sum(1)
    n_mask = torch.minimum((mask_ratio * n).round().long().clamp(min=1), n - 1).clamp(min=0)
    frac = 0.0 if pred_ratio == "1tok" else float(pred_ratio)
    n_pred = torch.minimum((frac * n).round().long().clamp(min=1), n_mask)
    order = torch.rand(B, N, generator=gen).masked_fill(~valid, 2.0).argsort(1).argsort(1)
    hidden = order < n_mask[:, None]
    pred = order < n_pred[:, None]
    hidden_rank = hidden.long().cumsum(1) - 1       # slots are pT-ordered: the pT rank among them

    def first(sel, multiple):                   # indices of the selected slots, selected first
        idx = (torch.arange(N) + N * (~sel).long()).argsort(1)
        k = min(N, -(-max(int(sel.sum(1).max()), 1) // multiple) * multiple)
        return idx[:, :k], sel.gather(1, idx[:, :k])

    pred_idx, pred_valid = first(pred, 1 if pred_ratio == "1tok" else 8)
    ranks = hidden_rank.gather(1, pred_idx).clamp(min=0)
    return (*first(valid & ~hidden, 16), pred_idx, pred_valid, ranks)


def visible_frame(x_vis, p4_vis, vis_valid, x_pred, p4_pred, pred_valid):
    """Both sides' axis-dependent features in the frame of the visible particles' summed
    4-vector: nothing the encoder reads depends on a hidden particle."""
    p4_vis = torch.where(vis_valid[..., None], p4_vis.float(), 0.0)
    axis = common.axis_of(p4_vis.sum(1))                                                # (B, 4)
    return (common.refeature(x_vis, p4_vis, vis_valid, axis),
            common.refeature(x_pred, p4_pred, pred_valid, axis))


class Decoder(nn.Module):
    """CrossMAE decoder: query = mask token + rank embedding; cross-attention only."""

    def __init__(self, dim, depth, heads, kv_heads, n_max, enc_depth, feature_mix):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.rank_embed = nn.Embedding(n_max, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, cross=True) for _ in range(depth))
        # feature mix: decoder block i reads sum_l mix[i, l] * encoder layer l; starts at the
        # last layer
        last = F.one_hot(torch.full((depth,), enc_depth - 1), enc_depth).float()
        self.mix = nn.Parameter(last) if feature_mix else None
        self.norm = RMSNorm(dim)

    def forward(self, tokens, layers, mem_valid, rank):
        # tokens (B, Nv, C) final encoder output, layers list of (B, Nv, C), rank (B, P) long
        q = self.mask_token + self.rank_embed(rank)                                  # (B, P, C)
        mask = key_mask(mem_valid)
        stack = torch.stack(layers) if self.mix is not None else None             # (L, B, Nv, C)
        for i, blk in enumerate(self.blocks):
            mem = tokens if self.mix is None else torch.einsum("l,lbnc->bnc", self.mix[i], stack)
            q = blk(q, mask, mem)
        return self.norm(q)


def timestep_embedding(t, dim=256):
    """Sinusoidal embedding of integer timesteps t (...) -> (..., dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    arg = t[..., None].float() * freqs
    return torch.cat([torch.cos(arg), torch.sin(arg)], -1)


class AdaLNBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h, y):
        shift, scale, gate = self.ada(y).chunk(3, -1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """MAR's denoiser: eps_hat(x_t, t, z) for one particle, conditioned on its decoder output."""

    def __init__(self, n_feat, cond_dim, width, depth):
        super().__init__()
        self.t_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.c_embed = nn.Linear(cond_dim, width)
        self.x_embed = nn.Linear(n_feat, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, n_feat)

    def zero_init(self):
        # every block starts as the identity and eps_hat = 0: the loss starts at E[noise^2] = 1
        for lin in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, z):
        y = self.t_embed(timestep_embedding(t)) + self.c_embed(z)
        h = self.x_embed(x)
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.final_ada(y).chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


def cosine_alpha_bar(steps, s=0.008):
    """Improved-DDPM cosine schedule: alpha_bar[t], t = 0..steps-1 (betas capped at 0.999)."""
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def diffusion_loss(net, x0, z, valid, t, noise, alpha_bar):
    """Epsilon MSE in fp32, averaged over the valid decoded particles and their (t, noise)
    draws. x0 (B, P, F) target, z (B, P, C) condition, valid (B, P), t (B, P, M) long,
    noise (B, P, M, F)."""
    with torch.autocast(x0.device.type, enabled=False):
        x0 = x0.float()[:, :, None].expand_as(noise)
        z = z.float()[:, :, None].expand(*noise.shape[:3], z.shape[-1])
        ab = alpha_bar[t][..., None]                                               # (B, P, M, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        err = ((net(xt, t, z) - noise) ** 2).mean(-1)                                # (B, P, M)
        return (err * valid[..., None]).sum() / (valid.sum() * err.shape[-1]).clamp(min=1)


def mse_loss(pred, x0, valid):
    """The ablation: squared error of the regressed features in fp32, averaged over the valid
    decoded particles. pred, x0 (B, P, F), valid (B, P)."""
    err = ((pred.float() - x0.float()) ** 2).mean(-1)                                    # (B, P)
    return (err * valid).sum() / valid.sum().clamp(min=1)


class DiffMAE(nn.Module):
    def __init__(self, cfg, args):
        super().__init__()
        *_, dec_depth, diff_width, diff_depth = SIZES[args.size]
        n_feat = cfg["in_dim"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg["dim"], dec_depth, cfg["heads"], cfg["kv_heads"], args.n_max,
                               cfg["depth"], args.feature_mix)
        # checkpoints from before --head are diffusion runs
        self.diff = self.mse = None
        if getattr(args, "head", "diffusion") == "diffusion":
            self.diff = DiffusionMLP(n_feat, cfg["dim"], diff_width, diff_depth)
            self.register_buffer("alpha_bar", cosine_alpha_bar(args.diff_steps), persistent=False)
        else:
            self.mse = nn.Linear(cfg["dim"], n_feat)
        # target standardisation, set by train() from a bounded training sample, saved
        self.register_buffer("t_mean", torch.zeros(n_feat))
        self.register_buffer("t_std", torch.ones(n_feat))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if self.diff is not None:
            self.diff.zero_init()

    def condition(self, x_vis, vis_valid, pred_rank):
        tokens, _, _, layers = self.encoder(x_vis, vis_valid, return_layers=True)
        return self.decoder(tokens, layers, vis_valid, pred_rank)                     # (B, P, C)

    def forward(self, x_vis, vis_valid, x_pred, pred_rank, pred_valid, t=None, noise=None):
        z = self.condition(x_vis, vis_valid, pred_rank)
        x0 = (x_pred.float() - self.t_mean) / self.t_std                             # (B, P, F)
        if self.mse is not None:
            return mse_loss(self.mse(z), x0, pred_valid)
        return diffusion_loss(self.diff, x0, z, pred_valid, t, noise, self.alpha_bar)


def make_batch(x, p4, valid, args, device, *keys):
    """x (B, N, F), p4 (B, N, 4), valid (B, N) CPU tensors -> the model's inputs. Masks and
    noise are drawn on the CPU (CPU and GPU runs see the same) from generators seeded by
    (seed, kind, *keys): keys = (rank, step) in training, so a resumed run, on every rank,
    draws what the uninterrupted run would."""
    mask_gen = common.generator(args.seed, "masks", *keys)
    noise_gen = common.generator(args.seed, "noise", *keys)
    vis_idx, vis_valid, pred_idx, pred_valid, hidden_rank = make_masks(
        valid, args.mask_ratio, args.pred_ratio, mask_gen)

    def take(a, i):                                                            # (B, K, a's last)
        return a.gather(1, i[..., None].expand(-1, -1, a.shape[-1]))
    x_vis = take(x, vis_idx)
    x_pred = take(x, pred_idx)
    if args.frame == "visible":
        x_vis, x_pred = visible_frame(x_vis, take(p4, vis_idx), vis_valid,
                                      x_pred, take(p4, pred_idx), pred_valid)
    rank = {"global": pred_idx, "hidden": hidden_rank, "none": torch.zeros_like(pred_idx)}
    batch = dict(x_vis=x_vis, vis_valid=vis_valid, x_pred=x_pred, pred_valid=pred_valid,
                 pred_rank=rank[args.query_rank])
    if args.head == "diffusion":
        shape = (*pred_idx.shape, args.diff_mul)
        batch["t"] = torch.randint(0, args.diff_steps, shape, generator=noise_gen)  # (B, P, M)
        batch["noise"] = torch.randn(*shape, x.shape[-1], generator=noise_gen)   # (B, P, M, F)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, stream, args, s):
    """Val loss (the same masks and noise at every eval) and collapse statistics of whole
    jets' vectors."""
    total = 0.0
    zs = []
    for i, b in enumerate(common.loader(stream, torch.device("cpu"))):
        batch = make_batch(b["x"], b["p4"], b["valid"], args, s.device, "val", i)
        with s.ctx:
            total += float(model(**batch)) * len(b["x"])
            jet = model.encoder(b["x"].to(s.device), b["valid"].to(s.device))[2]
        zs.append(jet.float().cpu())
    val_loss = common.check_val_loss(total / sum(map(len, zs)), f"{args.data} val")
    return dict(val_loss=val_loss, **common.collapse_stats(torch.cat(zs)))


# --- training --------------------------------------------------------------------------------
def encoder_config(args):
    depth, dim, heads, kv_heads, *_ = SIZES[args.size]
    names = common.FEATURE_NAMES[args.features]
    drop = args.drop_features.split(",")
    return dict(features=args.features, in_dim=len(names), dim=dim, depth=depth, heads=heads,
                kv_heads=kv_heads, input_cols=[i for i, f in enumerate(names) if f not in drop])


def target_stats(stream, args):
    """Mean and std (F,) of the targets make_batch draws (in their --frame) from a bounded,
    unshuffled training sample; a constant feature keeps std 1."""
    parts = []
    for i, b in enumerate(common.loader(stream, torch.device("cpu"))):
        batch = make_batch(b["x"], b["p4"], b["valid"], args, "cpu", "stats", i)
        parts.append(batch["x_pred"][batch["pred_valid"]])
    x = torch.cat(parts).double()
    std = x.std(0)
    return x.mean(0), torch.where(std > 1e-6, std, 1.0)


def train(args, data=None):
    """Pretrain; returns the final metrics. data: {"train": common.Jets, "val": common.Jets}
    to stream instead of args.data (tests, notebooks)."""
    s = common.setup(args)
    common.claim_output(os.path.join(args.out, "diffmae.pt"), args)

    def stream(split, **kw):
        return common.JetStream(data[split] if data else args.data, split, path=args.data_dir,
                                n_max=args.n_max, features=args.features, pad=PAD,
                                batch_size=args.batch_size, seed=args.seed,
                                workers=args.workers, **kw)
    train_stream = stream("train", n_jets=args.n_jets, rank=s.rank, world_size=s.world_size,
                          shuffle_buffer=args.shuffle_buffer)
    val_stream = stream("val", n_jets=args.n_eval, shuffle=False, drop_last=False)
    cfg = encoder_config(args)
    raw_model = DiffMAE(cfg, args).to(s.device)
    # --resume loads the saved target statistics over these
    sample = stream("train", n_jets=min(args.n_jets or 10_000, 10_000), shuffle=False,
                    drop_last=False)
    raw_model.t_mean[:], raw_model.t_std[:] = target_stats(sample, args)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    # MAR: betas (0.9, 0.95); weight decay on 2-D matrices, none in the diffusion MLP
    rest = [p for n, p in raw_model.named_parameters() if not n.startswith("diff.")]
    groups = common.decay_groups(rest, args.weight_decay)
    if raw_model.diff is not None:
        groups.append(dict(params=list(raw_model.diff.parameters()), weight_decay=0.0))
    opt = common.configure_optimizer(groups, args.lr, args.weight_decay, betas=(0.9, 0.95),
                                     device_type=s.device_type, kind=args.optimizer)
    start = 0
    if args.resume:
        start = common.resume_from(args.resume, raw_model, opt, args=args,
                                   data=train_stream.identity)
    common.optimizer_mode(opt, "train")   # schedule-free: a checkpoint holds the average x
    model = common.wrap_model(raw_model, s)
    log = None
    if s.master:  # one writer: rank 0 drops the records a resumed run logs again
        log = common.JsonlLogger(os.path.join(args.out, "diffmae.jsonl"),
                                 resume_step=start if args.resume else None)
        n_enc = sum(p.numel() for p in raw_model.encoder.parameters()) / 1e6
        n_all = sum(p.numel() for p in raw_model.parameters()) / 1e6
        print(f"diffmae {args.size}, preset {args.preset}, head {args.head}, query rank "
              f"{args.query_rank}, frame {args.frame}, {args.optimizer}: {n_enc:.2f}M encoder "
              f"params ({n_all:.2f}M in all), {train_stream.n} jets, {total} steps, "
              f"{s.device}, git {common.git_hash()}")
    bar = common.progress_bar(total, args.batch_size * s.world_size, start, s.master)
    result = {}
    short = 0   # jets with < 2 particles: nothing to hide or nothing to see, they weigh 0
    seen = 0
    # --- the loop: 1. masks + noise on CPU / 2. encoder(visible) -> decoder -> loss / 3. step
    t0 = time.time()
    for step, epoch, b in common.train_batches(train_stream, torch.device("cpu"), args.epochs,
                                               steps=args.steps, start_step=start):
        batch = make_batch(b["x"], b["p4"], b["valid"], args, s.device, s.rank, step)
        short += int((b["valid"].sum(1) < 2).sum())
        seen += len(b["valid"])
        # MAR and schedule-free: constant after the warm-up (min_lr = lr)
        common.set_lr(opt, common.lr_at(step, total, warmup, args.lr, min_lr=args.lr))
        with s.ctx:
            loss = model(**batch)
        common.check_finite(loss, step, train_stream.describe(b["source"][0]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        t0 = time.time()
        bar.update(args.batch_size * s.world_size)
        if s.master and (step + 1) % args.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.write(f"step {step + 1}/{total}: loss {loss.item():.4f}, dt {dt * 1000:.0f} ms")
        if (step + 1) % (args.eval_every or len(train_stream)) == 0 or step + 1 == total:
            # every rank swaps to the average and back, so the ranks' weights stay equal
            with common.averaged_weights(opt):
                if s.master:
                    result = dict(step=step + 1, loss=loss.item(),
                                  **evaluate(raw_model, val_stream, args, s))
                    bar.write(f"step {step + 1}/{total}: val loss {result['val_loss']:.4f} "
                              f"({val_stream.n} val jets), cos {result['cos']:.3f} std "
                              f"{result['std']:.3f} erank {result['erank']:.1f}")
                    log.log(result)
                    common.save_checkpoint(os.path.join(args.out, "diffmae.pt"),
                                           method="diffmae", args=args, encoder_config=cfg,
                                           encoder=raw_model.encoder, model=raw_model,
                                           optimizer=opt, step=step + 1,
                                           data=train_stream.identity)
            t0 = time.time()  # the next dt is a training step's, not the evaluation's
    bar.close()

    # --- end of run: the linear probe on the weights the checkpoint holds ---
    common.optimizer_mode(opt, "eval")
    if s.master and short:
        print(f"{short} of {seen} training jets had fewer than 2 particles and were "
              "dropped from the loss")
    if s.master and common.probe_possible(train_stream):
        result = result or evaluate(raw_model, val_stream, args, s)   # no steps: initial weights
        fit = stream("train", n_jets=min(args.n_eval or 20_000, train_stream.n), shuffle=False,
                     drop_last=False)
        z_fit, y_fit = common.embed_stream(raw_model.encoder, fit, s.device, s.ctx,
                                           ("x", "valid"))
        z_val, y_val = common.embed_stream(raw_model.encoder, val_stream, s.device, s.ctx,
                                           ("x", "valid"))
        probe = common.linear_probe(z_fit, y_fit, z_val, y_val)
        result.update(probe_acc=probe["acc"], probe_auc=probe["auc"], short_jets=short)
        print(f"linear probe on frozen jet vectors (fitted on {len(y_fit)} train jets, scored "
              f"on {len(y_val)} val jets): accuracy {probe['acc']:.4f}, AUC {probe['auc']:.4f}")
        log.log(dict(final=True, **result))
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
