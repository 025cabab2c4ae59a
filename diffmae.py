"""DiffMAE: a masked autoencoder for jets whose decoder is trained with a per-particle diffusion loss.

Idea. Hide a random fraction of a jet's particles (`--mask-ratio`, 12.5% by default). The encoder
sees only the visible particles. A CrossMAE decoder (arXiv 2401.14391) asks, for some of the hidden
particles (`--pred-ratio`: a fraction of the jet, or `1tok` = one particle per jet), "what was
here?": one query per particle, cross-attending to the encoder output and never to the other queries,
so any subset can be decoded. Instead of regressing the particle's features (plain MSE collapses
towards the mean particle), a small adaLN residual MLP conditioned on the decoder output learns to
denoise them: the diffusion loss of MAR (arXiv 2406.11838). The model is therefore also a
conditional generator of hidden particles (`ddpm_sample`, `--gen-check`). The pre-trained encoder is
used through mean pooling (`build_encoder`, finetune.py's `mean` head).

Blocks are LLaMA-style: RMSNorm pre-norm, SwiGLU feed-forward (hidden = 4 x width), grouped-query
attention (2 key/value groups) through `scaled_dot_product_attention` with a padding mask, no biases.
What replaces RoPE: a jet is a set, it has no sequence order. The encoder gets no positional
signal at all (it is exactly permutation-equivariant; masked particle modelling found an order
given at the input hurts). A decoder query must still say *which* hidden particle it asks for, so it
carries a learned embedding of the particle's pT rank in the full jet (particles are stored
pT-sorted, so the rank is its slot index) -- the role RoPE's position plays for a text token.

Deviations from the talk / papers, and why:
- Tokens use the "full" 17-feature recipe of common.load_jets (kinematics relative to the jet, track
  parameters, particle ID). The talk's 21 add the raw four-vector, which only repeats the relative
  kinematics plus the jet's absolute direction; we leave it out.
- Fixed-variance DDPM (posterior variance): MAR also learns the variance with a variational term.
- u-muP (unit-scaled maximal update parametrisation) is skipped: the `unit-scaling` package is beta
  and has no GQA, cross-attention or padding masks. Plain init (normal 0.02) and AdamW instead.
- One set of masks per jet and step; MAR's masking-ratio schedule is not used. A `--pred-ratio`
  above `--mask-ratio` is capped at the hidden count (CrossMAE decodes a subset of the hidden tokens).
- With a padding mask, SDPA's `enable_gqa` may fall back to the math kernel; `--attn expand`
  repeats K/V instead and `--bench N` times either (keep the faster on your GPU).

GPU:  python diffmae.py --data jetclass --preset 8m --epochs 20 --batch-size 512 --compile
CPU:  OMP_NUM_THREADS=1 python diffmae.py --data pythia --data-dir data/pythia10 --preset 1m \
          --n-jets 1000 --epochs 1 --batch-size 64
"""
import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config --------------------------------------------------------------------------------------
# name: (depth, width, query heads, kv groups, decoder depth, diffusion-MLP width, its depth)
PRESETS = {
    "tiny": (2, 32, 4, 2, 1, 64, 2),           # tests and smoke runs
    "1m": (4, 128, 4, 2, 2, 256, 3),           # the talk's sizes (encoder parameters)
    "8m": (8, 256, 8, 2, 4, 512, 3),
    "47m": (12, 512, 8, 2, 4, 1024, 3),        # diffusion MLP = MAR-L's 3 x 1024
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="1m", choices=list(PRESETS), help="encoder/decoder/MLP size")
    g.add_argument("--features", default="full", choices=["full", "kin"],
                   help="particle features: full = 17 (kinematics, tracks, PID), kin = 7")
    g.add_argument("--attn", default="gqa", choices=["gqa", "expand"],
                   help="GQA through SDPA's enable_gqa, or K/V expanded with repeat_interleave "
                        "(with a padding mask, enable_gqa may fall back to the math kernel)")
    g.add_argument("--feature-mix", action="store_true",
                   help="each decoder block cross-attends to its own learned mix of all encoder layers")
    g = p.add_argument_group("masking")
    g.add_argument("--mask-ratio", type=float, default=0.125, help="fraction of particles hidden")
    g.add_argument("--pred-ratio", default="1tok",
                   help="fraction of the jet's particles decoded (<= mask ratio), or 1tok")
    g = p.add_argument_group("loss")
    g.add_argument("--head", default="diffusion", choices=["diffusion", "mse"],
                   help="diffusion loss (MAR) or plain MSE reconstruction (the collapsing ablation)")
    g.add_argument("--diff-steps", type=int, default=1000, help="diffusion steps of the schedule")
    g.add_argument("--diff-mul", type=int, default=4, help="(t, noise) draws per token per step")
    g.add_argument("--sample-steps", type=int, default=100, help="respaced steps of the sampler")
    g.add_argument("--temperature", type=float, default=1.0, help="sampler noise temperature")
    g.add_argument("--sample-clip", type=float, default=5.0,
                   help="sampler: clamp predicted x0 to +-this (the ParT recipe clips to +-5); 0: off")
    g = p.add_argument_group("optimiser")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "schedulefree"],
                   help="AdamW + --schedule, or schedule-free AdamW (pip install schedulefree)")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="AdamW learning rate after warm-up (MAR: constant)")
    g.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (MAR: 0.95)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--probe-jets", type=int, default=5000, help="train jets for the end-of-run probe")
    g.add_argument("--gen-check", action="store_true",
                   help="at the end, sample hidden val particles; write gen_check.png + Wasserstein table")
    g.add_argument("--bench", type=int, default=0,
                   help="time this many training steps (after 5 untimed) and print jets/s, then exit")
    g.add_argument("--grid", action="store_true",
                   help="run the mask x pred grid (--grid-mask x --grid-pred) and print probe accuracy")
    g.add_argument("--grid-mask", default="0.125,0.25,0.5,0.75", help="mask ratios of the grid")
    g.add_argument("--grid-pred", default="1tok,0.125,0.25,0.5,0.75", help="pred ratios of the grid")
    # MAR's settings: AdamW betas (0.9, 0.95), weight decay 0.02, gradient clip 3.0
    p.set_defaults(lr=1e-3, weight_decay=0.02, grad_clip=3.0, n_eval=2000)
    args = p.parse_args(argv)
    if args.pred_ratio != "1tok":
        try:
            ok = 0 < float(args.pred_ratio) <= 1
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--pred-ratio {args.pred_ratio!r}: give a fraction in (0, 1] or 1tok")
    if args.gen_check and args.head != "diffusion":
        p.error("--gen-check samples from the diffusion head: drop --head mse")
    if not 0 < args.mask_ratio < 1:
        p.error(f"--mask-ratio {args.mask_ratio}: must lie in (0, 1)")
    return args


# --- LLaMA-style blocks ----------------------------------------------------------------------------
class Attention(nn.Module):
    """Grouped-query attention: `heads` query heads share `kv_heads` key/value heads."""

    def __init__(self, dim, heads, kv_heads, attn="gqa"):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.attn = heads, kv_heads, dim // heads, attn
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mem, mask):
        # x (B, Nq, C) queries, mem (B, Nk, C) keys/values, mask (B, 1, 1, Nk) bool, True = attend
        B, Nq, C = x.shape
        q = self.q(x).view(B, Nq, self.heads, self.hd).transpose(1, 2)                  # (B, H, Nq, D)
        k, v = self.kv(mem).view(B, -1, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)  # (B, G, Nk, D)
        if self.attn == "expand":       # query head h uses group h // (H / G), as enable_gqa does
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.attn == "gqa")
        return self.proj(y.transpose(1, 2).reshape(B, Nq, C))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block. cross=False: self-attention; cross=True: queries attend to a memory only."""

    def __init__(self, dim, heads, kv_heads, attn="gqa", cross=False):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.norm_mem = nn.RMSNorm(dim) if cross else None
        self.attn = Attention(dim, heads, kv_heads, attn)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, x, mask, mem=None):
        h = self.norm1(x)
        x = x + self.attn(h, h if mem is None else self.norm_mem(mem), mask)
        return x + self.mlp(self.norm2(x))


def key_mask(valid):
    """(B, N) bool -> (B, 1, 1, N) attention mask; an all-padded row may attend to its (zero) first
    slot so that softmax never sees a row without keys (which would give NaN)."""
    empty = ~valid.any(1, keepdim=True)                                                  # (B, 1)
    first = torch.arange(valid.shape[1], device=valid.device) == 0
    return (valid | (empty & first))[:, None, None, :]


class Encoder(nn.Module):
    """Permutation-equivariant transformer over particles; jet = masked mean of the tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        dim = cfg["dim"]
        self.embed = nn.Linear(cfg["in_dim"], dim, bias=False)
        self.blocks = nn.ModuleList(Block(dim, cfg["heads"], cfg["kv_heads"], cfg["attn"])
                                    for _ in range(cfg["depth"]))
        self.norm = nn.RMSNorm(dim)

    def forward(self, x, valid, p4=None, return_layers=False):
        # x (B, N, F), valid (B, N); p4 unused (the features already hold the kinematics)
        x = torch.where(valid[..., None], x, 0.0)     # a NaN in padding would survive 0-weight attention
        mask, h = key_mask(valid), self.embed(x)
        layers = []
        for blk in self.blocks:
            h = blk(h, mask)
            layers.append(h)
        tokens = self.norm(h)                                                            # (B, N, C)
        w = valid[..., None].to(tokens.dtype)
        jet = (tokens * w).sum(1) / w.sum(1).clamp(min=1)                                # (B, C)
        return (tokens, valid, jet, layers) if return_layers else (tokens, valid, jet)


def build_encoder(cfg):
    """finetune.py entry point: the encoder from a checkpoint's encoder_config."""
    return Encoder(cfg)


# --- the method: masking, CrossMAE decoder, diffusion loss, sampler --------------------------------
def make_masks(valid, mask_ratio, pred_ratio, gen):
    """Draw the hidden and the decoded particles of each jet (on CPU, from `gen`).
    valid (B, N) bool -> vis_idx (B, Nv), vis_valid (B, Nv), pred_idx (B, P), pred_valid (B, P).
    A jet with n >= 2 particles hides round(mask_ratio * n), at least 1 and at most n - 1, and
    decodes the first n_pred of them (1 for 1tok). Index tensors keep the pT order; Nv is padded to
    a multiple of 16 (P of 8) so that torch.compile sees few shapes."""
    B, N = valid.shape
    n = valid.sum(1)
    n_mask = (mask_ratio * n).round().long().clamp(min=1)
    n_mask = torch.minimum(n_mask, n - 1).clamp(min=0)
    frac = 0.0 if pred_ratio == "1tok" else float(pred_ratio)
    n_pred = torch.minimum((frac * n).round().long().clamp(min=1), n_mask)
    rank = torch.rand(B, N, generator=gen).masked_fill(~valid, 2.0).argsort(1).argsort(1)  # random order
    hidden, pred = rank < n_mask[:, None], rank < n_pred[:, None]
    visible = valid & ~hidden
    slot = torch.arange(N)

    def first(sel, multiple):                   # indices of the selected slots, selected first
        idx = (slot + N * (~sel).long()).argsort(1)
        k = min(N, -(-max(int(sel.sum(1).max()), 1) // multiple) * multiple)
        return idx[:, :k], sel.gather(1, idx[:, :k])

    vis_idx, vis_valid = first(visible, 16)
    pred_idx, pred_valid = first(pred, 1 if pred_ratio == "1tok" else 8)
    return vis_idx, vis_valid, pred_idx, pred_valid


class Decoder(nn.Module):
    """CrossMAE decoder: query = mask token + pT-rank embedding; cross-attention only."""

    def __init__(self, dim, depth, heads, kv_heads, n_max, enc_depth, feature_mix, attn):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.rank_embed = nn.Embedding(n_max, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attn, cross=True) for _ in range(depth))
        # feature mix: decoder block i reads sum_l mix[i, l] * encoder layer l; starts at the last layer
        self.mix = nn.Parameter(F.one_hot(torch.full((depth,), enc_depth - 1), enc_depth).float()) \
            if feature_mix else None
        self.norm = nn.RMSNorm(dim)

    def forward(self, tokens, layers, mem_valid, rank):
        # tokens (B, Nv, C) final encoder output, layers list of (B, Nv, C), rank (B, P) long
        q = self.mask_token + self.rank_embed(rank)                                       # (B, P, C)
        mask = key_mask(mem_valid)
        stack = torch.stack(layers) if self.mix is not None else None                   # (L, B, Nv, C)
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
    """MAR's denoiser: eps_hat(x_t, t, z) for one particle, conditioned on its decoder output z."""

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
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, x, t, z):
        y = self.t_embed(timestep_embedding(t)) + self.c_embed(z)
        h = self.x_embed(x)
        for blk in self.blocks:
            h = blk(h, y)
        shift, scale = self.final_ada(y).chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


def cosine_alpha_bar(steps, s=0.008):
    """Improved-DDPM cosine schedule: alpha_bar[t], t = 0..steps-1 (betas capped at 0.999)."""
    f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def diffusion_loss(net, x0, z, valid, t, noise, alpha_bar):
    """Epsilon MSE in fp32, averaged over the valid decoded particles and their (t, noise) draws.
    x0 (B, P, F) target, z (B, P, C) condition, valid (B, P), t (B, P, M) long, noise (B, P, M, F)."""
    with torch.autocast(x0.device.type, enabled=False):
        x0 = x0.float()[:, :, None].expand_as(noise)
        z = z.float()[:, :, None].expand(*noise.shape[:3], z.shape[-1])
        ab = alpha_bar[t][..., None]                                                  # (B, P, M, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        err = ((net(xt, t, z) - noise) ** 2).mean(-1)                                  # (B, P, M)
        w = valid[..., None].float().expand_as(err)
        return (err * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def ddpm_sample(net, z, n_feat, alpha_bar, steps=100, temperature=1.0, gen=None, clip=None):
    """Ancestral DDPM on the schedule respaced to `steps`; temperature scales only the added noise.
    z (..., C) -> samples (..., n_feat). Noise is drawn on CPU from `gen`. clip: clamp the predicted
    x0 to [-clip, clip] at every step; early steps divide by sqrt(alpha_bar) ~ 1e-4, so a poorly
    trained predictor would otherwise blow up (as image DDPMs clip to the pixel range)."""
    ts = torch.linspace(0, len(alpha_bar) - 1, steps).round().long()
    ab = alpha_bar.cpu().double()[ts]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    randn = lambda: torch.randn(*z.shape[:-1], n_feat, generator=gen).to(z.device)
    x = randn()
    for i in reversed(range(steps)):
        eps = net(x, ts[i].to(z.device).expand(x.shape[:-1]), z)
        x0 = (x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        x0 = x0.clamp(-clip, clip) if clip else x0
        mean = (ab_prev[i].sqrt() * beta[i] * x0 + (1 - beta[i]).sqrt() * (1 - ab_prev[i]) * x) / (1 - ab[i])
        x = mean.float()
        if i > 0:
            x = x + temperature * float((beta[i] * (1 - ab_prev[i]) / (1 - ab[i])).sqrt()) * randn()
    return x


class DiffMAE(nn.Module):
    def __init__(self, cfg, args):
        super().__init__()
        *_, dec_depth, diff_width, diff_depth = PRESETS[args.preset]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg["dim"], dec_depth, cfg["heads"], cfg["kv_heads"], args.n_max,
                               cfg["depth"], args.feature_mix, cfg["attn"])
        self.head = args.head
        if args.head == "diffusion":
            self.diff = DiffusionMLP(cfg["in_dim"], cfg["dim"], diff_width, diff_depth)
        else:
            self.mse = nn.Linear(cfg["dim"], cfg["in_dim"])
        self.register_buffer("alpha_bar", cosine_alpha_bar(args.diff_steps), persistent=False)
        self.apply(init_weights)
        if args.head == "diffusion":
            self.diff.zero_init()

    def condition(self, x_vis, vis_valid, pred_rank):
        tokens, _, _, layers = self.encoder(x_vis, vis_valid, return_layers=True)
        return self.decoder(tokens, layers, vis_valid, pred_rank)                          # (B, P, C)

    def forward(self, x_vis, vis_valid, x_pred, pred_rank, pred_valid, t, noise):
        z = self.condition(x_vis, vis_valid, pred_rank)
        if self.head == "mse":
            err = ((self.mse(z).float() - x_pred.float()) ** 2).mean(-1)
            return (err * pred_valid).sum() / pred_valid.sum().clamp(min=1)
        return diffusion_loss(self.diff, x_pred, z, pred_valid, t, noise, self.alpha_bar)


def init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


# --- optimiser ---------------------------------------------------------------------------------------
def make_optimizer(model, args, total_steps):
    """Weight decay on the 2-D matrices of encoder and decoder only: not on norm gains, the mask
    token, nor anywhere in the diffusion MLP (as MAR)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("diff.") else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if args.optimizer == "schedulefree":
        try:
            import schedulefree  # optional dependency, imported only when asked for
        except ImportError:
            raise SystemExit("--optimizer schedulefree: the package is missing; pip install schedulefree")
        return schedulefree.AdamWScheduleFree(groups, lr=args.lr, betas=(0.9, args.beta2),
                                              warmup_steps=args.warmup)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=False)


def lr_at(step, total_steps, args):
    if args.schedule == "cosine":
        return common.lr_at(step, total_steps, args.warmup, args.lr)
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))


def opt_mode(opt, train):
    """Schedule-free AdamW holds different parameter values for training and for evaluation."""
    if hasattr(opt, "train"):
        opt.train() if train else opt.eval()


# --- batches -------------------------------------------------------------------------------------------
def make_batch(x, valid, args, mask_gen, noise_gen, device):
    """x (B, N, F), valid (B, N) CPU tensors -> the model's inputs. Every random draw is made on the
    CPU from its own generator, so CPU and GPU runs see the same masks and noise."""
    vis_idx, vis_valid, pred_idx, pred_valid = make_masks(valid, args.mask_ratio, args.pred_ratio, mask_gen)
    take = lambda i: x.gather(1, i[..., None].expand(-1, -1, x.shape[-1]))
    B, P = pred_idx.shape
    t = torch.randint(0, args.diff_steps, (B, P, args.diff_mul), generator=noise_gen)
    noise = torch.randn(B, P, args.diff_mul, x.shape[-1], generator=noise_gen)
    batch = dict(x_vis=take(vis_idx), vis_valid=vis_valid, x_pred=take(pred_idx), pred_rank=pred_idx,
                 pred_valid=pred_valid, t=t, noise=noise)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def val_loss(model, jets, args, device, ctx, batch_size):
    mask_gen, noise_gen = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(4321)
    total, n = 0.0, 0
    for i in range(0, len(jets), batch_size):
        x, valid = (torch.from_numpy(np.array(a[i:i + batch_size])) for a in (jets.x, jets.valid))
        batch = make_batch(x, valid, args, mask_gen, noise_gen, device)
        with ctx:
            total += float(model(**batch)) * len(batch["t"])
        n += len(batch["t"])
    return total / max(n, 1)


@torch.no_grad()
def gen_check(model, jets, args, device, ctx, feature_names, path):
    """Sample the decoded particles of val jets from their decoder condition and compare with the truth:
    per-feature Wasserstein-1 (sample vs truth) against the same distance between the truth and true
    particles of *other* jets (a generator that ignores its jet), plus a PNG of histograms."""
    gen = torch.Generator().manual_seed(99)
    batch = make_batch(torch.from_numpy(np.array(jets.x)), torch.from_numpy(np.array(jets.valid)),
                       args, gen, gen, device)
    with ctx:
        z = model.condition(batch["x_vis"], batch["vis_valid"], batch["pred_rank"])
    sel = batch["pred_valid"].cpu()
    true = batch["x_pred"].cpu()[sel]                                                       # (M, F)
    fake = ddpm_sample(model.diff, z.float()[batch["pred_valid"]], true.shape[1], model.alpha_bar,
                       args.sample_steps, args.temperature, gen, args.sample_clip).cpu()
    order = torch.randperm(len(true), generator=gen)   # val jets are stored class by class: mix them
    true, fake, half = true[order], fake[order], len(true) // 2
    # baseline: a "generator" that ignores its jet, i.e. true particles of other jets (the second half)
    w1 = lambda a, b: float((a.sort(0)[0] - b.sort(0)[0]).abs().mean())
    rows = [(name, w1(fake[:half, f], true[:half, f]), w1(true[half:2 * half, f], true[:half, f]))
            for f, name in enumerate(feature_names)]
    print(f"generation check on {half} val particles: feature, W1(sampled, true), W1(other jets, true)")
    for name, a, b in rows:
        print(f"  {name:16s} {a:8.4f} {b:8.4f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    show = [feature_names.index(n) for n in ("pt_log", "deltaR", "deta", "dphi")]
    fig, axes = plt.subplots(1, len(show), figsize=(4 * len(show), 3.2))
    for ax, f in zip(np.atleast_1d(axes), show):
        lo, hi = np.quantile(true[:, f].numpy(), [0.005, 0.995])
        kw = dict(bins=40, range=(lo, hi), histtype="step", density=True)
        ax.hist(true[:, f].numpy(), label="true", **kw)
        ax.hist(fake[:, f].numpy(), label="sampled", **kw)
        ax.set_xlabel(feature_names[f])
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return {f"w1_{n}": a for n, a, _ in rows} | {f"w1_base_{n}": b for n, _, b in rows}


# --- training ------------------------------------------------------------------------------------------
def encoder_config(args, in_dim):
    depth, dim, heads, kv_heads, *_ = PRESETS[args.preset]
    return dict(in_dim=in_dim, dim=dim, depth=depth, heads=heads, kv_heads=kv_heads, attn=args.attn,
                features=args.features)


def train(args):
    if args.grid:
        return grid(args)
    s = common.setup(args)
    load = lambda split, n: common.load_jets(args.data, args.data_dir, split=split, n_jets=n,
                                             n_max=args.n_max, features=args.features)
    jets, val = load("train", args.n_jets), load("val", args.n_eval)
    cfg = encoder_config(args, jets.x.shape[-1])
    raw_model = DiffMAE(cfg, args).to(s.device)
    n_enc = sum(p.numel() for p in raw_model.encoder.parameters())
    n_all = sum(p.numel() for p in raw_model.parameters())
    per_epoch = common.steps_per_epoch(len(jets), args.batch_size, s.world_size)
    total_steps = args.epochs * per_epoch
    if args.bench and total_steps < args.bench + 5:
        raise SystemExit(f"--bench {args.bench} needs {args.bench + 5} steps, the run has {total_steps}: "
                         "raise --epochs or --n-jets")
    opt = make_optimizer(raw_model, args, total_steps)
    model = common.wrap_model(raw_model, s)
    gens = dict(mask=torch.Generator().manual_seed(args.seed * 1000 + s.rank + 1),
                noise=torch.Generator().manual_seed(args.seed * 1000 + s.rank + 2))
    start = common.resume_from(args.resume, raw_model, opt, gens) if args.resume else 0
    ckpt_path = os.path.join(args.out, "diffmae.pt")
    log = common.JsonlLogger(os.path.join(args.out, "diffmae.jsonl"))
    if s.master:
        print(f"diffmae {args.preset} head={args.head} mask={args.mask_ratio} pred={args.pred_ratio}: "
              f"encoder {n_enc / 1e6:.2f}M params (all {n_all / 1e6:.2f}M), {len(jets)} jets, "
              f"{total_steps} steps, {s.device}, torch {torch.__version__}, git {common.git_hash()}")

    def save(step):  # called in evaluation mode (schedule-free: stores the averaged weights)
        common.save_checkpoint(ckpt_path, method="diffmae", args=args, encoder_config=cfg,
                               encoder=raw_model.encoder, model=raw_model, optimizer=opt, step=step,
                               generators=gens)

    def embed(encoder, jets):  # mean-pooled encoder output of whole (unmasked) jets, (N, C)
        return common.embed(encoder, dict(x=jets.x, valid=jets.valid), s.device, s.ctx, 256, ("x",))

    def evaluate(step):  # validation loss + collapse diagnostics of the jet representations
        z = embed(raw_model.encoder, val)
        return dict(step=step, val_loss=val_loss(raw_model, val, args, s.device, s.ctx, args.batch_size),
                    **common.collapse_stats(z))

    # --- the loop: 1. masks on CPU / 2. encoder(visible) -> decoder(queries) -> loss / 3. step ---
    raw_model.train(), opt_mode(opt, True)
    data = dict(x=jets.x, valid=jets.valid)
    eval_every = args.eval_every or per_epoch
    t0, result, step = time.time(), {}, start
    for step, epoch, b in common.train_batches(data, args.batch_size, torch.device("cpu"), args.epochs,
                                               seed=args.seed, start_step=start, rank=s.rank,
                                               world_size=s.world_size, trim=("x",)):
        batch = make_batch(b["x"], b["valid"], args, gens["mask"], gens["noise"], s.device)
        if args.optimizer == "adamw":
            common.set_lr(opt, lr_at(step, total_steps, args))
        with s.ctx:
            loss = model(**batch)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.bench and step + 1 in (5, 5 + args.bench):   # 5 untimed steps (compile, warm-up)
            if s.device.type == "cuda":
                torch.cuda.synchronize()
            if step + 1 == 5:
                t0 = time.time()
            else:
                jps = args.bench * args.batch_size * s.world_size / (time.time() - t0)
                print(f"bench {args.preset} attn={args.attn} compile={s.compile}: {jps:.0f} jets/s")
                return dict(jets_per_s=jps)
        if s.master and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            raw_model.eval(), opt_mode(opt, False)
            result = dict(loss=loss.item(), lr=opt.param_groups[0]["lr"], **evaluate(step + 1))
            print(f"step {step + 1}/{total_steps} loss {result['loss']:.4f} val {result['val_loss']:.4f} "
                  f"cos {result['cos']:.3f} std {result['std']:.3f} erank {result['erank']:.1f} "
                  f"({time.time() - t0:.0f}s)")
            log.log(result)
            save(step + 1)
            raw_model.train(), opt_mode(opt, True)

    # --- end of run: linear probe on frozen jet vectors, generation check ---
    raw_model.eval(), opt_mode(opt, False)
    if s.master:
        result = result or evaluate(step)        # --epochs 0: the randomly initialised encoder
        tr, te = load("train", args.probe_jets), load("test", args.n_eval)
        z_tr, z_te = embed(raw_model.encoder, tr), embed(raw_model.encoder, te)
        result["probe_acc"] = common.linear_probe(z_tr, tr.y, z_te, te.y)["acc"]
        print(f"probe accuracy {result['probe_acc']:.4f} ({len(tr)} train / {len(te)} test jets); "
              f"val jets: cos {result['cos']:.3f} std {result['std']:.3f} erank {result['erank']:.1f}")
        if args.gen_check:
            result |= gen_check(raw_model, val, args, s.device, s.ctx, common.FEATURE_NAMES[args.features],
                                os.path.join(args.out, "gen_check.png"))
        log.log(dict(final=True, **result))
    common.cleanup(s)
    return result


def grid(args):
    """The talk's mask-ratio x pred-ratio sweep: one pre-training run per cell, probe accuracy table.
    Cells decoding more than is hidden are skipped (CrossMAE decodes a subset of the masked tokens)."""
    masks, preds = [float(m) for m in args.grid_mask.split(",")], args.grid_pred.split(",")
    table = {}
    for m in masks:
        for p in preds:
            if p != "1tok" and float(p) > m:
                continue
            a = copy.copy(args)
            a.grid, a.mask_ratio, a.pred_ratio = False, m, p
            a.out = os.path.join(args.out, f"grid_m{m}_p{p}")
            table[(m, p)] = train(a)["probe_acc"]
    print("probe accuracy, rows = mask ratio, columns = pred ratio")
    print("mask   " + "".join(f"{p:>8s}" for p in preds))
    for m in masks:
        print(f"{m:<7g}" + "".join(f"{table[(m, p)]:8.3f}" if (m, p) in table else f"{'-':>8s}" for p in preds))
    return {f"m{m}_p{p}": v for (m, p), v in table.items()}


if __name__ == "__main__":
    train(get_args())
