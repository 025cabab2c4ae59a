"""J-JEPA: a jet is reclustered into subjets; an encoder that sees only some of them (the
context) must let a small predictor guess the representations that a slowly moving copy of
itself (the EMA target encoder) gives to the others (the targets). Nothing is reconstructed in
input space and no augmentation is needed. Paper: J-JEPA, arXiv 2412.05333.

Here, and where it differs from the paper's public code (whose bugs are avoided):
- Every split is streamed (common.JetStream); loader workers cluster each batch's subjets (C/A
  R=0.2, 20 x 30) into idx (B, S, P), indices into the particle axis of x (B, L, F), -1 = none,
  and positions pos (B, S, 3). Jets below --min-subjets (paper: 10) get no target and no loss
  weight: shapes stay fixed and DDP ranks take equal steps; finetune.py selects with n_subjets.
- SEL (--sel): "mlp" flattens a subjet's P x F particles; "attn" (the paper's better one) lets
  each particle attend within its subjet, then pools each subjet by class attention.
- Positions: the subjet's (deta, dphi) from the frame's axis, the official "space" option;
  --pos-pt adds log pT_sub/pT_frame (off: a target's pT is content to infer, not to be told).
- Leakage: the context encoder attends ONLY to context subjets (the official code encodes the
  whole jet, then selects). With --context-frame jet (the paper's) target information still
  reaches it: features and positions are relative to the whole jet's axis, pT and E, targets
  included (1 - the context's summed pT fraction gives the targets', correlation 0.999).
  --context-frame context recomputes the online encoder's logptrel, logerel, deltaR, deta, dphi
  and positions from p4 relative to the context subjets' own summed 4-vector (the predictor's
  target positions too): only the number of context subjets still hints at the targets'. The
  EMA target encoder sees the whole jet anyway and keeps the jet frame.
- Targets: round(30%) of a jet's non-empty subjets in K fixed slots, so the predictor's mask
  follows its tokens (the official one was misaligned); masks from common.generator(seed,
  "masks", rank, step). EMA momentum cosine from --ema-start to 1, advanced once per step (the
  official code did it twice); targets are its layer-normed outputs. finetune.py and the probe
  use the EMA encoder. Collapse: the paper's measure (mean pairwise cosine of the flattened
  subjet tokens of 128 jets; paper 0.457) beside the pooled vectors' cosine, std, erank.
- Presets SjT-T / AE-SjT-T: the paper's sizes (AE-SjT-T 4.1M encoder parameters; SjT-T 2.35M vs
  2.1M) and the official optimisation (lr 1e-4, wd 0.01, EMA from 0.99, no warm-up). Published
  (Top Tagging, >= 10 subjets): acc 87.5-90.0%, 1/eps_B(0.5) 40-99.

GPU: python jjepa.py --preset AE-SjT-T --data jetclass --min-subjets 10 --epochs 50 --workers 8
CPU (README quickstart: small preset, embedded default data): python jjepa.py
Tiny CPU check: python jjepa.py --n-jets 512 --n-eval 256 --epochs 1 --batch-size 64
"""
import argparse
import copy
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config ---------------------------------------------------------------------------------

# dim/depth/heads: subjet transformer; sel_*: subjet embedding layer; pred_*: predictor;
# lr/ema_start/warmup: optimisation (the paper presets follow the official code)
PRESETS = {
    "small": dict(dim=64, depth=4, heads=4, mlp_ratio=4, sel="attn", sel_dim=32, sel_depth=1,
                  pred_dim=32, pred_depth=2, pred_heads=4, lr=1e-3, ema_start=0.996),
    "SjT-T": dict(dim=96, depth=24, heads=16, mlp_ratio=3, sel="mlp", sel_dim=256, sel_depth=0,
                  pred_dim=64, pred_depth=12, pred_heads=4, lr=1e-4, ema_start=0.99, warmup=0),
    "AE-SjT-T": dict(dim=96, depth=24, heads=16, mlp_ratio=3, sel="attn", sel_dim=128,
                     sel_depth=8, pred_dim=64, pred_depth=12, pred_heads=4, lr=1e-4,
                     ema_start=0.99, warmup=0),
}
PAD = "batch"  # the encoder needs no fixed particle axis


def checked(cast, ok, what):
    """argparse type: cast, then reject values that are not `what`."""
    def parse(text):
        if not ok(value := cast(text)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


POS, NON_NEG = checked(int, lambda v: v > 0, "> 0"), checked(int, lambda v: v >= 0, ">= 0")
WEIGHT = checked(float, lambda v: v >= 0, ">= 0")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(epochs=4, batch_size=256, lr=None, weight_decay=0.01)
    g = p.add_argument_group("subjets")
    g.add_argument("--subjet-r", type=checked(float, lambda v: v > 0, "> 0"), default=0.2,
                   help="C/A subjet radius")
    g.add_argument("--n-subjets", type=POS, default=20, help="leading subjets kept per jet")
    g.add_argument("--n-per-subjet", type=POS, default=30, help="leading particles per subjet")
    g.add_argument("--min-subjets", type=NON_NEG, default=0,
                   help="jets with fewer non-empty subjets get no weight in the loss (paper: 10)")
    g = p.add_argument_group("model (None = from --preset)")
    g.add_argument("--preset", default="small", choices=list(PRESETS), help="the named recipe")
    g.add_argument("--sel", choices=["mlp", "attn"], help="subjet embedding layer")
    g.add_argument("--dim", type=POS, help="subjet token width")
    g.add_argument("--depth", type=POS, help="subjet transformer blocks")
    g.add_argument("--heads", type=POS, help="attention heads")
    g.add_argument("--pred-dim", type=POS, help="predictor width (narrow, as in the paper)")
    g.add_argument("--pred-depth", type=POS, help="predictor blocks")
    g.add_argument("--pos-pt", action="store_true", help="add log pT_sub/pT_frame to the positions")
    g = p.add_argument_group("J-JEPA")
    g.add_argument("--target-frac", type=checked(float, lambda v: 0 < v < 1, "in (0, 1)"),
                   default=0.3, help="fraction of a jet's non-empty subjets used as targets")
    g.add_argument("--context-frame", default="jet", choices=["jet", "context"],
                   help="the context's features are relative to the whole jet (paper; leaks the "
                        "targets' total) or to the context subjets' own sum")
    g.add_argument("--ema-start", type=checked(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
                   help="EMA momentum at step 0; cosine schedule to 1 at the last step")
    g.add_argument("--var-weight", type=WEIGHT, default=0.0, help="VICReg variance term (context jets)")
    g.add_argument("--cov-weight", type=WEIGHT, default=0.0, help="VICReg covariance term")
    g.add_argument("--log-every", type=POS, default=10, help="print a step line every N steps")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def encoder_config(args):
    keys = ("dim", "depth", "heads", "mlp_ratio", "sel", "sel_dim", "sel_depth", "pos_pt",
            "subjet_r", "n_subjets", "n_per_subjet")
    return dict(in_dim=len(common.FEATURE_NAMES["kin"]), **{k: getattr(args, k) for k in keys})


# --- subjet inputs (made in the loader workers) ------------------------------------------------

def relative(p4, axis):
    """(deta, dphi, pT) of p4 (B, M, 4) from axis (B, 4) = (pt, eta, phi, E), as the data layer."""
    pt = torch.hypot(p4[..., 0], p4[..., 1])
    eta = torch.asinh(p4[..., 2] / pt.clamp(min=1e-8))
    sign = torch.where(axis[:, 1:2] >= 0, 1.0, -1.0)
    dphi = common.wrap_phi(torch.atan2(p4[..., 1], p4[..., 0]) - axis[:, 2:3])
    return sign * (eta - axis[:, 1:2]), dphi, pt


def subjet_positions(sub_p4, axis):
    """sub_p4 (B, S, 4) subjet 4-vectors, axis (B, 4) -> (B, S, 3) float32 (deta, dphi,
    log pT_subjet/pT_axis); zero for empty subjets."""
    deta, dphi, pt = relative(sub_p4, axis)
    pos = torch.stack([deta, dphi, torch.log(pt.clamp(min=1e-8) / axis[:, 0:1])], -1)
    return pos.masked_fill((pt <= 0)[..., None], 0.0).float()


def add_subjets(batch, R, n_subjets, n_per_subjet):
    """The worker transform: cluster this batch's jets, add idx (B, S, P) and pos (B, S, 3)."""
    sub = common.cluster_subjets(batch["p4"], batch["valid"], "ca", R, n_subjets, n_per_subjet)
    batch["idx"] = np.where(sub.valid, sub.idx, -1).astype(np.int16)  # L <= n_max < 32768
    batch["pos"] = subjet_positions(torch.from_numpy(sub.p4), torch.from_numpy(batch["jet"])).numpy()
    return batch


def batch_transform(cfg):
    return functools.partial(add_subjets, R=cfg["subjet_r"], n_subjets=cfg["n_subjets"],
                             n_per_subjet=cfg["n_per_subjet"])


def encoder_inputs(batch, cfg):
    return dict(x=batch["x"], idx=batch["idx"], pos=batch["pos"])


def n_subjets(batch_or_idx):
    """(B,) non-empty subjets per jet (numpy or torch); --min-subjets keeps n_subjets >= it."""
    idx = batch_or_idx["idx"] if isinstance(batch_or_idx, dict) else batch_or_idx
    return (idx >= 0).any(-1).sum(-1)


def context_frame(x, p4, valid, idx, keep):
    """x (B, L, F) "kin" features and pos (B, S, 3) as common.features_flat makes them, but from
    the summed 4-vector of the particles of the subjets with keep=True (pt_log, e_log stay)."""
    B, S, P = idx.shape
    p4, idx = p4.float(), idx.long()
    parts = torch.gather(p4, 1, idx.clamp(min=0).view(B, S * P, 1).expand(-1, -1, 4))
    sub_p4 = (parts.view(B, S, P, 4) * (idx >= 0)[..., None]).sum(2)  # (B, S, 4)
    c = (sub_p4 * keep[..., None]).sum(1)  # (B, 4): the context's own 4-vector
    c_pt = torch.hypot(c[:, 0], c[:, 1]).clamp(min=1e-8)
    axis = torch.stack([c_pt, torch.asinh(c[:, 2] / c_pt), torch.atan2(c[:, 1], c[:, 0]), c[:, 3]], -1)
    deta, dphi, pt = relative(p4, axis)  # (B, L) each
    rel = torch.stack([torch.log(pt / axis[:, 0:1]), torch.log(p4[..., 3] / axis[:, 3:4])], -1)
    rel = torch.cat([(rel + 4.7) * 0.7, (torch.hypot(deta, dphi)[..., None] - 0.2) * 4.0], -1)
    new = torch.cat([x[..., :2].float(), rel.clamp(-5, 5), x[..., 5:-2].float(),
                     torch.stack([deta, dphi], -1)], -1)
    return torch.where(valid[..., None], new, 0.0).to(x.dtype), subjet_positions(sub_p4, axis)


# --- the model ------------------------------------------------------------------------------

class SubjetPool(nn.Module):
    """Class attention with one query per subjet: a learned CLS vector reads the particles of
    its own subjet only. (B, N, W) particles, member (B, S, N) -> (B, S, W)."""

    def __init__(self, W, heads):
        super().__init__()
        self.heads, self.cls = heads, nn.Parameter(torch.zeros(1, 1, W))
        self.norm1, self.norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.q, self.kv, self.proj = nn.Linear(W, W), nn.Linear(W, 2 * W), nn.Linear(W, W)
        self.mlp = common.Mlp(W, 4 * W)

    def forward(self, h, member):
        (B, N, W), S = h.shape, member.shape[1]
        k, v = self.kv(self.norm1(h)).view(B, N, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = self.q(self.cls).view(1, 1, self.heads, -1).transpose(1, 2).expand(B, -1, S, -1)
        bias = torch.where(member, 0.0, -1e4).to(q.dtype)[:, None]  # (B, 1, S, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, S, W/H)
        out = self.cls + self.proj(a.transpose(1, 2).reshape(B, S, W))
        return out + self.mlp(self.norm2(out))


class SubjetEmbedding(nn.Module):
    """SEL: a subjet's particles -> one (dim,) token. 'attn' runs on the jet's particle axis with
    a same-subjet mask rather than on S x P padded slots: the same function, ~6x fewer tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.kind, P, F_in, W = cfg["sel"], cfg["n_per_subjet"], cfg["in_dim"], cfg["sel_dim"]
        if self.kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(P * F_in, W), nn.GELU(), nn.Linear(W, cfg["dim"]))
        else:
            heads = max(1, W // 32)
            self.embed = nn.Sequential(nn.Linear(F_in, W), nn.GELU(), nn.Linear(W, W))
            self.blocks = nn.ModuleList(common.Block(W, heads) for _ in range(cfg["sel_depth"]))
            self.pool = SubjetPool(W, heads)
            self.out = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, cfg["dim"]))

    def forward(self, x, idx):
        (B, S, P), N, pvalid = idx.shape, x.shape[1], idx >= 0  # x (B, N, F); idx into N, -1 = none
        if self.kind == "mlp":
            gather_idx = idx.clamp(min=0).view(B, S * P, 1).expand(-1, -1, x.shape[-1])
            parts = torch.gather(x, 1, gather_idx).view(B, S, P, -1) * pvalid[..., None]
            return self.mlp(parts.view(B, S, -1))  # (B, S, dim)
        # subjet of each particle (B, N), -1 if in none; padded slots scatter into column N
        sid = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
        src = torch.arange(S, device=x.device).view(1, S, 1).expand(B, S, P)
        sid = sid.scatter(1, torch.where(pvalid, idx, N).view(B, -1), src.reshape(B, -1))[:, :N]
        same = (sid[:, :, None] == sid[:, None, :]) & (sid >= 0)[:, None, :]  # (B, N, N)
        h = self.embed(x)  # (B, N, W)
        # particles in no kept subjet have no valid key: they attend uniformly (finite, unused)
        bias = torch.where(same, 0.0, -1e4).to(h.dtype)[:, None]  # (B, 1, N, N)
        for block in self.blocks:
            h = block(h, bias)
        member = sid[:, None, :] == torch.arange(S, device=x.device)[None, :, None]  # (B, S, N)
        return self.out(self.pool(h, member))  # (B, S, dim); empty subjets: finite garbage


class SubjetEncoder(nn.Module):
    """forward(x (B, L, F), idx (B, S, P), pos (B, S, 3), keep (B, S) or None)
    -> tokens (B, S, C), tok_valid (B, S), jet (B, C). Only subjets with keep=True (default:
    all non-empty ones) are visible to attention; tokens elsewhere are zeroed."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        self.n_pos = 3 if cfg.get("pos_pt", True) else 2  # older checkpoints used the pT term
        self.sel = SubjetEmbedding(cfg)
        self.pos_embed = common.Mlp(self.n_pos, cfg["dim"], cfg["dim"])
        self.blocks = nn.ModuleList(common.Block(cfg["dim"], cfg["heads"], cfg["mlp_ratio"])
                                    for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(cfg["dim"])

    def forward(self, x, idx, pos, keep=None):
        idx, nonempty = idx.long(), (idx >= 0).any(-1)
        tok_valid = nonempty if keep is None else keep & nonempty  # (B, S)
        h = self.sel(x, idx) + self.pos_embed(pos[..., :self.n_pos])  # (B, S, C)
        # masked keys: a context token can read nothing of a target or empty subjet
        bias = common.attention_bias(tok_valid, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        tokens = self.norm(h) * tok_valid[..., None]
        jet = tokens.sum(1) / tok_valid.sum(1, keepdim=True).clamp(min=1)
        return tokens, tok_valid, jet


def build_encoder(cfg):
    return SubjetEncoder(cfg)


class Predictor(nn.Module):
    """Narrow transformer: context tokens + one mask token per target slot (carrying the
    target's position) -> predicted target representations (B, K, C)."""

    def __init__(self, dim, pred_dim, depth, heads, mlp_ratio, n_pos):
        super().__init__()
        self.n_pos, self.inp, self.pos_embed = n_pos, nn.Linear(dim, pred_dim), common.Mlp(n_pos, pred_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.blocks = nn.ModuleList(common.Block(pred_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm, self.out = nn.LayerNorm(pred_dim), nn.Linear(pred_dim, dim)

    def forward(self, ctx_tokens, ctx_valid, pos, tgt_idx, tgt_valid):
        S, K = ctx_tokens.shape[1], tgt_idx.shape[1]
        pe = self.pos_embed(pos[..., :self.n_pos])  # (B, S, D)
        tgt_pe = torch.gather(pe, 1, tgt_idx[..., None].expand(-1, -1, pe.shape[-1]))  # (B, K, D)
        h = torch.cat([self.inp(ctx_tokens) + pe, self.mask_token + tgt_pe], 1)  # (B, S+K, D)
        bias = common.attention_bias(torch.cat([ctx_valid, tgt_valid], 1), dtype=h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        return self.out(self.norm(h[:, S:S + K]))


def sample_targets(idx, args, gen):
    """idx (B, S, P) -> tgt_idx (B, K) long, tgt_valid (B, K), context (B, S), on idx's device.
    A jet with n non-empty subjets gets round(frac n) targets, >= 1 if n >= 2, <= n - 1, none
    below --min-subjets. Scores from the CPU generator `gen` (CPU and GPU draw the same), empty
    subjets last: the first n_tgt of the order are the targets."""
    nonempty, K = (idx >= 0).any(-1), max(1, math.floor(args.target_frac * idx.shape[1] + 0.5))
    n = nonempty.sum(1)
    n_tgt = torch.minimum(torch.floor(args.target_frac * n + 0.5).clamp(min=1), n - 1).clamp(min=0)
    score = torch.rand(nonempty.shape, generator=gen).to(idx.device).masked_fill(~nonempty, 2.0)
    tgt_idx = score.argsort(dim=1, stable=True)[:, :K]
    tgt_valid = (torch.arange(K, device=idx.device) < n_tgt[:, None]) & (n >= args.min_subjets)[:, None]
    target = torch.zeros_like(nonempty).scatter(1, tgt_idx, tgt_valid)
    return dict(tgt_idx=tgt_idx, tgt_valid=tgt_valid, context=nonempty & ~target)


class JJEPA(nn.Module):
    """Online encoder + predictor (trained) and the EMA target encoder (not trained)."""

    def __init__(self, cfg, args):
        super().__init__()
        self.encoder = SubjetEncoder(cfg)
        self.predictor = Predictor(cfg["dim"], args.pred_dim, args.pred_depth, args.pred_heads,
                                   cfg["mlp_ratio"], self.encoder.n_pos)
        self.target_encoder = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.frame = args.context_frame
        self.var_weight, self.cov_weight = args.var_weight, args.cov_weight

    def train(self, mode=True):
        super().train(mode)
        self.target_encoder.eval()  # always: the teacher never uses train-mode behaviour
        return self

    def context_inputs(self, x, p4, valid, idx, pos, context):  # x and pos in --context-frame
        return (x, pos) if self.frame == "jet" else context_frame(x, p4, valid, idx, context)

    def forward(self, x, idx, pos, p4, valid, tgt_idx, tgt_valid, context):
        # 1. targets: EMA encoder on the whole jet, layer-normed, gathered at the target slots
        with torch.no_grad():
            t = self.target_encoder(x, idx, pos)[0]
            t = F.layer_norm(t.float(), t.shape[-1:])
            t = torch.gather(t, 1, tgt_idx[..., None].expand(-1, -1, t.shape[-1]))  # (B, K, C)
        # 2. context encoder (context subjets only) + predictor
        x, pos = self.context_inputs(x, p4, valid, idx, pos, context)
        tokens, ctx_valid, jet = self.encoder(x, idx, pos, keep=context)
        pred = self.predictor(tokens, ctx_valid, pos, tgt_idx, tgt_valid).float()
        err = (pred - t).pow(2).mean(-1)  # (B, K)
        loss = (err * tgt_valid).sum() / tgt_valid.sum().clamp(min=1)
        if self.var_weight or self.cov_weight:  # optional anti-collapse terms (VICReg)
            w = tgt_valid.any(1).float()[:, None]  # (B, 1) the jets the loss uses
            n = w.sum().clamp(min=2)
            z = (jet.float() - (w * jet.float()).sum(0) / n) * w
            cov = (z.T @ z) / (n - 1)
            std = (cov.diagonal() + 1e-4).sqrt()
            off_diag = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
            loss = loss + self.var_weight * F.relu(1 - std).mean() + self.cov_weight * off_diag / z.shape[1]
        return loss


def ema_momentum(step, total_steps, start):
    return 1.0 - (1.0 - start) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(raw_model, stream, args, cfg, s):
    """Val loss (masks from a fixed generator, so evals compare) and the EMA encoder's collapse
    measures on the jets passing --min-subjets: the paper's (mean pairwise cosine of the
    flattened (S x C) subjet tokens of 128 jets) and common.collapse_stats of the jet vectors."""
    raw_model.eval()
    gen, loss_sum, n_tgt, n_jets, zs, flat = common.generator(args.seed, "val-masks"), 0.0, 0, 0, [], []
    for batch in common.loader(stream, s.device):
        inputs, masks = encoder_inputs(batch, cfg), sample_targets(batch["idx"], args, gen)
        with s.ctx:
            loss = raw_model(**inputs, p4=batch["p4"], valid=batch["valid"], **masks)
            tokens, _, z = raw_model.target_encoder(**inputs)
        k, use = int(masks["tgt_valid"].sum()), n_subjets(batch) >= args.min_subjets
        loss_sum, n_tgt, n_jets = loss_sum + float(loss) * k, n_tgt + k, n_jets + len(z)
        zs.append(z.float()[use].cpu())
        flat += [tokens.float()[use].flatten(1).cpu()] if sum(map(len, flat)) < 128 else []
    raw_model.train()
    if sum(map(len, zs)) < 2:
        raise SystemExit(f"--min-subjets {args.min_subjets}: fewer than 2 of the {n_jets} val "
                         "jets have that many subjets; lower it")
    z = torch.cat(zs)
    return dict(val_loss=loss_sum / max(n_tgt, 1), kept=len(z) / n_jets, **common.collapse_stats(z),
                paper_cos=common.collapse_stats(torch.cat(flat)[:128])["cos"])


# --- training ---------------------------------------------------------------------------------

def train(args):
    s = common.setup(args)
    cfg = encoder_config(args)
    stream = functools.partial(common.JetStream, args.data, path=args.data_dir, n_max=args.n_max,
                               batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                               shuffle_buffer=args.shuffle_buffer, transform=batch_transform(cfg),
                               pad=PAD)
    train_stream = stream(split="train", n_jets=args.n_jets, rank=s.rank, world_size=s.world_size)
    val_stream = stream(split="val", n_jets=args.n_eval, shuffle=False, drop_last=False)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    raw_model = JJEPA(cfg, args).to(s.device)
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start_step = common.resume_from(args.resume, raw_model, optimizer) if args.resume else 0
    model = common.wrap_model(raw_model, s)
    if s.master:
        size = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"  # noqa: E731
        print(f"jjepa: {train_stream.n} train jets/epoch, {val_stream.n} val, {total} steps, "
              f"{s.device}, {args.preset}: encoder {size(raw_model.encoder)}, predictor "
              f"{size(raw_model.predictor)}, git {common.git_hash()}, torch {torch.__version__}")
    eval_every, per_step = args.eval_every or len(train_stream), args.batch_size * s.world_size
    logger = common.JsonlLogger(os.path.join(args.out, "jjepa.jsonl")) if s.master else None
    bar = common.progress_bar(total, per_step, start_step, s.master)
    stats, t0 = {}, time.perf_counter()
    # --- the flat loop: 1. batch + masks  2. forward (target, context, predictor)
    #     3. backward + step  4. EMA update of the target encoder
    for step, epoch, batch in common.train_batches(train_stream, s.device, args.epochs,
                                                   steps=args.steps, start_step=start_step):
        masks = sample_targets(batch["idx"], args, common.generator(args.seed, "masks", s.rank, step))
        if step == start_step and not masks["tgt_valid"].any():
            raise SystemExit(f"--min-subjets {args.min_subjets}: no jet of the first batch has "
                             "that many subjets; lower it")
        lr = common.lr_at(step, total, warmup, args.lr)
        common.set_lr(optimizer, lr)
        with s.ctx:
            loss = model(**encoder_inputs(batch, cfg), p4=batch["p4"], valid=batch["valid"], **masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        ema_update(raw_model.target_encoder, raw_model.encoder, ema_momentum(step, total, args.ema_start))
        bar.update(per_step)
        t1, done = time.perf_counter(), step + 1
        dt, t0 = t1 - t0, t1
        if done % args.log_every == 0 or done % eval_every == 0 or done == total:
            common.check_finite(loss, step)  # on every rank, so none waits on a stopped one
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if s.master and done % args.log_every == 0:
                bar.write(f"step {done}/{total} (epoch {epoch}) loss {loss.item():.4f} "
                          f"lr {lr:.2e} dt {1e3 * dt:.0f} ms")
        if s.master and (done % eval_every == 0 or done == total):
            stats = dict(step=done, loss=loss.item(), lr=lr,
                         **evaluate(raw_model, val_stream, args, cfg, s))
            logger.log(stats)
            bar.write(f"val step {done}: loss {stats['val_loss']:.4f} | EMA encoder: paper cos "
                      f"{stats['paper_cos']:.3f}, pooled cos {stats['cos']:.3f} std "
                      f"{stats['std']:.3f} erank {stats['erank']:.1f} | jets used {stats['kept']:.0%}")
            # the encoder finetune.py reads is the EMA target encoder
            common.save_checkpoint(os.path.join(args.out, "jjepa.pt"), method="jjepa", args=args,
                                   model=raw_model, encoder=raw_model.target_encoder,
                                   encoder_config=cfg, optimizer=optimizer, step=done)
            t0 = time.perf_counter()  # the next dt leaves the evaluation out
    bar.close()
    if s.master:  # the one probe protocol: fit on a bounded train sample, score on val
        fit = stream(split="train", n_jets=min(args.n_eval or 20_000, train_stream.n),
                     shuffle=False, drop_last=False)
        embed = functools.partial(common.embed_stream, raw_model.target_encoder, device=s.device,
                                  ctx=s.ctx, inputs=functools.partial(encoder_inputs, cfg=cfg))
        (z_fit, y_fit), (z_val, y_val) = embed(stream=fit), embed(stream=val_stream)
        probe = common.linear_probe(z_fit, y_fit, z_val, y_val)
        stats.update({f"probe_{k}": v for k, v in probe.items() if k != "per_class"})
        print(f"linear probe, EMA encoder (fit on {len(y_fit)} train jets, scored on {len(y_val)} "
              f"val jets): acc {probe['acc']:.4f} auc {probe['auc']:.4f} 1/eps_B(0.5) {probe['rej50']:.1f}")
    common.cleanup(s)
    return stats


if __name__ == "__main__":
    train(get_args())
