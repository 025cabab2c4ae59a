"""J-JEPA: a jet is reclustered into subjets; an encoder that sees only some of them (the
context) must let a small predictor guess the representations that a slowly moving copy of
itself (the EMA target encoder) gives to the others (the targets). No reconstruction in input
space, no augmentation. Paper: J-JEPA, arXiv 2412.05333. Kin-only: the particles enter with the
7 ParT "kin" features (no particle ID, no impact parameters), so finetune.py can read the
encoder on any data, Top Tagging included.

Deviations from the paper's public code (whose bugs are avoided):
- Streamed data: loader workers cluster each batch's subjets (C/A R=0.2, 20 x 30) into idx
  (B, S, P), indices into x (B, L, F). A jet needs a context and a target subjet: jets with
  fewer than max(2, --min-subjets) (paper: 10) non-empty subjets get no target and no loss
  weight (fixed shapes, equal DDP steps) and are counted; finetune.py selects as the paper.
- Positions: the official code embeds a subjet's (eta, phi) only. Here both encoders embed
  (deta, dphi) from the frame's axis AND the subjet's own pT (--pos-pt log: log pT_sub/pT_frame;
  fraction: pT_sub/pT_frame; none: the official positions): a subjet's pT is content its
  encoder may read. The predictor's queries for the targets carry (deta, dphi) only: a
  target's pT is what it must infer, never an input. Measured (finetune.py --scratch, flatten
  head, 3 seeds, AUC mean +- s.e.): on the default sample at 10% labels (400, 20 steps) none
  0.789 +- 0.054, log 0.922 +- 0.012; on a jetgen top/QCD set (seed 20, 3,000 jets per class,
  2,000 labels, 1,800 test jets) log 0.9735 +- 0.0012, fraction 0.9694 +- 0.0003 (paired:
  log +0.0040 +- 0.0013), so log, the data layer's own form, is the default.
- SEL "attn" attends within each subjet, then pools it by class attention; "mlp" flattens its
  P x F particles. The small default adds VICReg terms (2, 0.1) and EMA from 0.99 against
  collapse (generated jets: paper cosine 0.79 -> 0.49, erank 12.5 -> 19.7).
- The context encoder attends ONLY to context subjets (the official one encodes the whole jet,
  then selects), in the context's own frame by default: --context-frame context recomputes
  logptrel, logerel, deltaR, deta, dphi and positions relative to the context's summed
  4-vector (target positions for the predictor too); only the number of context subjets still
  hints at the targets. The paper's --context-frame jet leaks them: features and positions
  relative to the whole jet give the targets' pT fraction (1 - the context's, correlation
  0.999), so it is no longer the default, for the paper presets either.
- Masks: round(30%) targets in K fixed slots (the official predictor mask was misaligned),
  drawn by common.generator(seed, "masks", rank, step); EMA advanced once per step (official:
  twice). Loss: MSE to the layer-normed targets (paper), or --loss smooth-l1 (I-JEPA's, beta 1).
  Collapse: the paper's measure (cosine of flattened subjet tokens; paper 0.457) beside
  common.collapse_stats. Presets SjT-T / AE-SjT-T: the paper's sizes (2.35M (paper 2.1M) /
  4.1M), lr 1e-4, EMA from 0.99, no warm-up; published on Top Tagging jets with >= 10 subjets:
  acc 87.5-90.0%, 1/eps_B(0.5) 40-99.
GPU: python jjepa.py --preset AE-SjT-T --data jetclass --min-subjets 10 --epochs 50 --workers 8
CPU: python jjepa.py (README quickstart)
Tiny: python jjepa.py --n-jets 512 --n-eval 256 --epochs 1
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

# the paper's recipes (official options): subjet transformer dim/depth/heads, subjet embedding
# layer sel_*, narrow predictor pred_*, its optimisation, and its plain loss (no VICReg terms);
# without --preset the flags' defaults are the small CPU recipe
PAPER = dict(dim=96, depth=24, heads=16, mlp_ratio=3, pred_dim=64, pred_depth=12, pred_heads=4,
             lr=1e-4, ema_start=0.99, warmup=0, var_weight=0.0, cov_weight=0.0)
PRESETS = {
    "SjT-T": dict(PAPER, sel="mlp", sel_dim=256, sel_depth=0),
    "AE-SjT-T": dict(PAPER, sel="attn", sel_dim=128, sel_depth=8),
}
# the paper's clustering (C/A R=0.2, 20 subjets x 30 particles); finetune.py's --min-subjets
# reads a checkpoint's own settings and falls back to these
SUBJETS = dict(subjet_r=0.2, n_subjets=20, n_per_subjet=30)
PAD = "batch"  # the encoder needs no fixed particle axis

POS = common.positive_int
NON_NEG = common.nonneg_int
WEIGHT = common.nonneg_float


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(epochs=4, batch_size=256, lr=1e-3, weight_decay=0.01)
    g = p.add_argument_group("subjets")
    g.add_argument("--subjet-r", type=common.positive_float, default=SUBJETS["subjet_r"],
                   help="C/A radius")
    g.add_argument("--n-subjets", type=POS, default=SUBJETS["n_subjets"],
                   help="leading subjets kept per jet")
    g.add_argument("--n-per-subjet", type=POS, default=SUBJETS["n_per_subjet"],
                   help="leading particles per subjet")
    g.add_argument("--min-subjets", type=NON_NEG, default=0,
                   help="jets below get no target and no loss weight (paper: 10)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="the paper's recipe: its values replace the defaults; flags given win")
    g.add_argument("--sel", choices=["mlp", "attn"], default="attn",
                   help="subjet embedding layer")
    g.add_argument("--sel-dim", type=POS, default=32, help="subjet embedding layer width")
    g.add_argument("--sel-depth", type=NON_NEG, default=1,
                   help="particle attention blocks within a subjet (--sel attn)")
    g.add_argument("--dim", type=POS, default=64, help="subjet token width")
    g.add_argument("--depth", type=POS, default=4, help="subjet transformer blocks")
    g.add_argument("--heads", type=POS, default=4, help="attention heads")
    g.add_argument("--mlp-ratio", type=POS, default=4, help="feed-forward width / token width")
    g.add_argument("--pred-dim", type=POS, default=32,
                   help="predictor width (narrow, as in the paper)")
    g.add_argument("--pred-depth", type=POS, default=2, help="predictor blocks")
    g.add_argument("--pred-heads", type=POS, default=4, help="predictor attention heads")
    g.add_argument("--pos-pt", choices=["log", "fraction", "none"], default="log",
                   help="the subjet's pT in the encoders' positions, beside (deta, dphi): "
                        "log pT_sub/pT_frame, pT_sub/pT_frame, or none (the official code's); "
                        "the predictor's target queries never carry it")
    g = p.add_argument_group("J-JEPA")
    g.add_argument("--target-frac", default=0.3,
                   type=common.number_type(float, lambda v: 0 < v < 1, "a fraction in (0, 1)"),
                   help="fraction of a jet's non-empty subjets used as targets")
    g.add_argument("--context-frame", default="context", choices=["jet", "context"],
                   help="context features relative to the context's own sum, or to the whole "
                        "jet (the paper's; leaks the targets' pT fraction)")
    g.add_argument("--loss", choices=["mse", "smooth-l1"], default="mse",
                   help="distance to the layer-normed targets: MSE (paper) or smooth L1 (I-JEPA)")
    g.add_argument("--ema-start", type=common.unit, default=0.99,
                   help="EMA momentum at step 0; cosine schedule to 1 at the last step")
    g.add_argument("--var-weight", type=WEIGHT, default=2.0,
                   help="VICReg variance term on the context jet vectors (paper: 0)")
    g.add_argument("--cov-weight", type=WEIGHT, default=0.1,
                   help="VICReg covariance term on the context jet vectors (paper: 0)")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    # a jet needs a context and a target subjet; settings that give no jet both stop here
    need = "J-JEPA needs a context and a target subjet per jet"
    if args.n_subjets < 2:
        p.error(f"{need}: --n-subjets {args.n_subjets} keeps fewer than 2")
    if args.n_max < 2:
        p.error(f"{need}: --n-max {args.n_max} leaves at most one subjet")
    if args.min_subjets > args.n_subjets:
        p.error(f"--min-subjets {args.min_subjets} exceeds --n-subjets {args.n_subjets}: "
                "no jet could pass")
    return args


def encoder_config(args):
    keys = ("dim", "depth", "heads", "mlp_ratio", "sel", "sel_dim", "sel_depth", "pos_pt",
            *SUBJETS)
    return dict(in_dim=len(common.FEATURE_NAMES["kin"]), **{k: getattr(args, k) for k in keys})


# --- subjet inputs (made in the loader workers) ------------------------------------------------

def add_subjets(batch, subjet_r, n_subjets, n_per_subjet):
    """The worker transform: cluster this batch's jets, add idx (B, S, P) and pos (B, S, 3)."""
    sub = common.cluster_subjets(batch["p4"], batch["valid"], "ca", subjet_r, n_subjets,
                                 n_per_subjet)
    batch["idx"] = np.where(sub.valid, sub.idx, -1).astype(np.int16)  # L <= n_max < 32768
    pos = common.in_frame(torch.from_numpy(sub.p4), torch.from_numpy(batch["jet"]))
    batch["pos"] = pos.numpy()  # (deta, dphi, log pT_sub/pT_jet)
    return batch


def batch_transform(cfg):
    return functools.partial(add_subjets, **{k: cfg[k] for k in SUBJETS})


def encoder_inputs(batch, cfg):
    return dict(x=batch["x"], idx=batch["idx"], pos=batch["pos"])


def n_subjets(batch_or_idx):
    """(B,) non-empty subjets per jet (numpy or torch) of a batch or its idx."""
    idx = batch_or_idx["idx"] if isinstance(batch_or_idx, dict) else batch_or_idx
    return (idx >= 0).any(-1).sum(-1)


def context_frame(x, p4, valid, idx, keep):
    """x (B, L, F) features and pos (B, S, 3) as the data layer makes them, but in the frame of
    the summed 4-vector of the particles of the subjets with keep=True."""
    B, S, P = idx.shape
    p4 = p4.float()
    idx = idx.long()
    parts = torch.gather(p4, 1, idx.clamp(min=0).view(B, S * P, 1).expand(-1, -1, 4))
    sub_p4 = (parts.view(B, S, P, 4) * (idx >= 0)[..., None]).sum(2)  # (B, S, 4)
    axis = common.axis_of((sub_p4 * keep[..., None]).sum(1))  # (B, 4): the context's own axis
    return common.refeature(x, p4, valid, axis), common.in_frame(sub_p4, axis)


# --- the model ------------------------------------------------------------------------------

class SubjetPool(nn.Module):
    """Class attention, a learned CLS query per subjet reading its own particles only:
    (B, N, W) particles, member (B, S, N) -> (B, S, W)."""

    def __init__(self, W, heads):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, W))
        self.norm1 = nn.LayerNorm(W)
        self.norm2 = nn.LayerNorm(W)
        self.attn = common.Attention(W, heads)
        self.mlp = common.Mlp(W, 4 * W)

    def forward(self, h, member):
        bias = torch.where(member, 0.0, -1e4)[:, None]  # (B, 1, S, N)
        queries = self.cls.expand(len(h), member.shape[1], -1)
        out = self.cls + self.attn(queries, self.norm1(h), bias)
        return out + self.mlp(self.norm2(out))  # (B, S, W)


class SubjetEmbedding(nn.Module):
    """SEL: a subjet's particles -> one (dim,) token. 'attn' runs on the jet's particle axis with
    a same-subjet mask rather than on S x P padded slots: the same function, ~6x fewer tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg["sel"]
        P = cfg["n_per_subjet"]
        F_in = cfg["in_dim"]
        W = cfg["sel_dim"]
        if self.kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(P * F_in, W), nn.GELU(), nn.Linear(W, cfg["dim"]))
        else:
            heads = max(1, W // 32)
            self.embed = nn.Sequential(nn.Linear(F_in, W), nn.GELU(), nn.Linear(W, W))
            self.blocks = nn.ModuleList(common.Block(W, heads) for _ in range(cfg["sel_depth"]))
            self.pool = SubjetPool(W, heads)
            self.out = nn.Sequential(nn.LayerNorm(W), nn.Linear(W, cfg["dim"]))

    def forward(self, x, idx):
        B, S, P = idx.shape  # x (B, N, F); idx into N, -1 = no particle
        N = x.shape[1]
        pvalid = idx >= 0
        if self.kind == "mlp":
            gather_idx = idx.clamp(min=0).view(B, S * P, 1).expand(-1, -1, x.shape[-1])
            parts = torch.gather(x, 1, gather_idx).view(B, S, P, -1) * pvalid[..., None]
            return self.mlp(parts.view(B, S, -1))  # (B, S, dim)
        # subjet of each particle (B, N), -1 if in none; padded slots scatter into column N
        sid = torch.full((B, N + 1), -1, dtype=torch.long, device=x.device)
        src = torch.arange(S, device=x.device).view(1, S, 1).expand(B, S, P)
        dest = torch.where(pvalid, idx, N).view(B, -1)
        sid = sid.scatter(1, dest, src.reshape(B, -1))[:, :N]
        same = (sid[:, :, None] == sid[:, None, :]) & (sid >= 0)[:, None, :]  # (B, N, N)
        h = self.embed(x)  # (B, N, W)
        # particles in no kept subjet have no valid key: they attend uniformly (finite, unused)
        bias = torch.where(same, 0.0, -1e4).to(h.dtype)[:, None]  # (B, 1, N, N)
        for block in self.blocks:
            h = block(h, bias)
        member = sid[:, None, :] == torch.arange(S, device=x.device)[None, :, None]  # (B, S, N)
        return self.out(self.pool(h, member))  # (B, S, dim); empty subjets: finite garbage


def pos_pt_of(cfg):
    """The encoders' pT position. Older checkpoints stored a bool (or nothing: pT was in)."""
    value = cfg.get("pos_pt", True)
    return {True: "log", False: "none"}.get(value, value)


class SubjetEncoder(nn.Module):
    """(x (B, L, F), idx (B, S, P), pos (B, S, 3), keep (B, S) or None) -> tokens (B, S, C),
    tok_valid (B, S), jet (B, C). Attention sees only the non-empty subjets with keep=True;
    each token's position is its subjet's (deta, dphi) and, unless --pos-pt none, its pT."""

    def __init__(self, cfg):
        super().__init__()
        self.pos_pt = pos_pt_of(cfg)
        self.sel = SubjetEmbedding(cfg)
        self.pos_embed = common.Mlp(2 if self.pos_pt == "none" else 3, cfg["dim"], cfg["dim"])
        self.blocks = nn.ModuleList(common.Block(cfg["dim"], cfg["heads"], cfg["mlp_ratio"])
                                    for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(cfg["dim"])

    def forward(self, x, idx, pos, keep=None):
        idx = idx.long()
        nonempty = (idx >= 0).any(-1)
        tok_valid = nonempty if keep is None else keep & nonempty  # (B, S)
        where = pos[..., :2]  # (B, S, 2) deta, dphi
        if self.pos_pt == "log":
            where = pos
        elif self.pos_pt == "fraction":  # 0 for an empty subjet (its log is stored as 0)
            where = torch.cat([where, pos[..., 2:].exp() * nonempty[..., None]], -1)
        h = self.sel(x, idx) + self.pos_embed(where)  # (B, S, C)
        # masked keys: a context token can read nothing of a target or empty subjet
        bias = common.attention_bias(tok_valid, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        tokens = self.norm(h) * tok_valid[..., None]
        jet = tokens.sum(1) / tok_valid.sum(1, keepdim=True).clamp(min=1)
        return tokens, tok_valid, jet


build_encoder = SubjetEncoder  # the method-module interface: build_encoder(cfg)


class Predictor(nn.Module):
    """Narrow transformer: context tokens + one mask token per target slot -> predicted target
    representations (B, K, C). Every token's position here is (deta, dphi) alone: the context
    tokens already hold their pT, and a target's pT must not reach its query."""

    def __init__(self, cfg, args):
        super().__init__()
        D = args.pred_dim
        self.inp = nn.Linear(cfg["dim"], D)
        self.pos_embed = common.Mlp(2, D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList(common.Block(D, args.pred_heads, cfg["mlp_ratio"])
                                    for _ in range(args.pred_depth))
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, cfg["dim"])

    def forward(self, ctx_tokens, ctx_valid, pos, tgt_idx, tgt_valid):
        S = ctx_tokens.shape[1]
        pe = self.pos_embed(pos[..., :2])  # (B, S, D)
        tgt_pe = torch.gather(pe, 1, tgt_idx[..., None].expand(-1, -1, pe.shape[-1]))  # (B, K, D)
        h = torch.cat([self.inp(ctx_tokens) + pe, self.mask_token + tgt_pe], 1)  # (B, S+K, D)
        bias = common.attention_bias(torch.cat([ctx_valid, tgt_valid], 1), dtype=h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        return self.out(self.norm(h[:, S:]))


def sample_targets(idx, args, gen):
    """idx (B, S, P) -> tgt_idx (B, K), tgt_valid (B, K), context (B, S): round(frac n) of a
    jet's n non-empty subjets (>= 1, <= n - 1: none below 2 or --min-subjets), scored on the
    CPU by `gen`."""
    nonempty = (idx >= 0).any(-1)
    K = max(1, math.floor(args.target_frac * idx.shape[1] + 0.5))
    n = nonempty.sum(1)
    n_tgt = torch.floor(args.target_frac * n + 0.5).clamp(min=1)
    n_tgt = torch.minimum(n_tgt, n - 1).clamp(min=0)
    score = torch.rand(nonempty.shape, generator=gen).to(idx.device).masked_fill(~nonempty, 2.0)
    tgt_idx = score.argsort(dim=1, stable=True)[:, :K]
    slots = torch.arange(K, device=idx.device)
    tgt_valid = (slots < n_tgt[:, None]) & (n >= args.min_subjets)[:, None]
    target = torch.zeros_like(nonempty).scatter(1, tgt_idx, tgt_valid)
    return dict(tgt_idx=tgt_idx, tgt_valid=tgt_valid, context=nonempty & ~target)


class JJEPA(nn.Module):
    """Online encoder + predictor (trained), EMA target encoder (not; no dropout anywhere)."""

    def __init__(self, cfg, args):
        super().__init__()
        self.encoder = SubjetEncoder(cfg)
        self.predictor = Predictor(cfg, args)
        self.target_encoder = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.frame = args.context_frame
        self.loss = args.loss
        self.var_weight = args.var_weight
        self.cov_weight = args.cov_weight

    def forward(self, x, idx, pos, p4, valid, tgt_idx, tgt_valid, context):
        # 1. targets: EMA encoder on the whole jet, layer-normed, gathered at the target slots
        with torch.no_grad():
            t = self.target_encoder(x, idx, pos)[0]
            t = F.layer_norm(t.float(), t.shape[-1:])
            t = torch.gather(t, 1, tgt_idx[..., None].expand(-1, -1, t.shape[-1]))  # (B, K, C)
        # 2. context encoder (context subjets only) + predictor
        if self.frame == "context":
            x, pos = context_frame(x, p4, valid, idx, context)
        tokens, ctx_valid, jet = self.encoder(x, idx, pos, keep=context)
        pred = self.predictor(tokens, ctx_valid, pos, tgt_idx, tgt_valid).float()
        if self.loss == "mse":
            err = (pred - t).pow(2).mean(-1)  # (B, K)
        else:  # quadratic below 1, linear above: a badly predicted target pulls less
            err = F.smooth_l1_loss(pred, t, reduction="none", beta=1.0).mean(-1)
        loss = (err * tgt_valid).sum() / tgt_valid.sum().clamp(min=1)
        if self.var_weight or self.cov_weight:  # VICReg terms on the context jet vectors
            w = tgt_valid.any(1).float()[:, None]  # (B, 1): the jets the loss uses
            n = w.sum().clamp(min=2)
            z = (jet.float() - (w * jet.float()).sum(0) / n) * w
            cov = (z.T @ z) / (n - 1)
            eye = torch.eye(z.shape[1], device=z.device, dtype=torch.bool)
            std = (cov.diagonal() + 1e-4).sqrt()
            loss = loss + self.var_weight * F.relu(1 - std).mean() \
                + self.cov_weight * cov.masked_fill(eye, 0.0).pow(2).sum() / z.shape[1]
        return loss


@torch.no_grad()
def ema_update(target, online, step, total_steps, start):
    """target <- m target + (1 - m) online; m: cosine from `start` to 1 at the last step."""
    m = 1.0 - (1.0 - start) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - m)


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(raw_model, stream, args, cfg, s):
    """Val loss (masks from a fixed generator: evals compare), the fraction of val jets with no
    target, and the EMA encoder's collapse: the paper's (flattened (S x C) tokens of 128 jets)
    and collapse_stats of the jet vectors."""
    raw_model.eval()
    gen = common.generator(args.seed, "val-masks")
    loss_sum = 0.0
    n_tgt = 0
    n_jets = 0
    no_target = 0
    zs = []
    flat = []
    for batch in common.loader(stream, s.device):
        inputs = encoder_inputs(batch, cfg)
        masks = sample_targets(batch["idx"], args, gen)
        with s.ctx:
            loss = raw_model(**inputs, p4=batch["p4"], valid=batch["valid"], **masks)
            tokens, _, z = raw_model.target_encoder(**inputs)
        k = int(masks["tgt_valid"].sum())
        use = n_subjets(batch) >= args.min_subjets
        loss_sum += float(loss) * k
        n_tgt += k
        n_jets += len(z)
        no_target += int((~masks["tgt_valid"].any(1)).sum())
        zs.append(z.float()[use].cpu())
        if sum(map(len, flat)) < 128:
            flat.append(tokens.float()[use].flatten(1).cpu())
    raw_model.train()
    if n_tgt == 0 or sum(map(len, zs)) < 2:
        raise SystemExit(f"fewer than 2 of the {n_jets} val jets have max(2, --min-subjets "
                         f"{args.min_subjets}) non-empty subjets: nothing to predict; lower "
                         "--min-subjets or use other jets")
    z = torch.cat(zs)
    val_loss = common.check_val_loss(loss_sum / n_tgt, f"{args.data} val")
    return dict(val_loss=val_loss, kept=len(z) / n_jets, no_target=no_target / n_jets,
                **common.collapse_stats(z),
                paper_cos=common.collapse_stats(torch.cat(flat)[:128])["cos"])


# --- training ---------------------------------------------------------------------------------

def train(args, data=None):
    """Pretrain; returns the last evaluation's and the probe's figures. data: {split: Jets}
    streamed instead of the --data files (tests)."""
    s = common.setup(args)
    cfg = encoder_config(args)
    common.claim_output(os.path.join(args.out, "jjepa.pt"), args)

    def stream(split, **kw):
        return common.JetStream(data[split] if data is not None else args.data, split,
                                path=args.data_dir, n_max=args.n_max, pad=PAD,
                                batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                                shuffle_buffer=args.shuffle_buffer,
                                transform=batch_transform(cfg), **kw)

    train_stream = stream("train", n_jets=args.n_jets, rank=s.rank, world_size=s.world_size)
    val_stream = stream("val", n_jets=args.n_eval, shuffle=False, drop_last=False)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    raw_model = JJEPA(cfg, args).to(s.device)
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start_step = 0
    if args.resume:
        start_step = common.resume_from(args.resume, raw_model, optimizer, args=args,
                                        data=train_stream.identity)
    model = common.wrap_model(raw_model, s)
    if s.master:
        size = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"  # noqa: E731
        recipe = args.preset or "small (the defaults)"
        print(f"jjepa: {train_stream.n} train jets/epoch, {val_stream.n} val, {total} steps, "
              f"{s.device}, {recipe}: encoder {size(raw_model.encoder)}, "
              f"predictor {size(raw_model.predictor)}, git {common.git_hash()}, "
              f"torch {torch.__version__}")
    eval_every = args.eval_every or len(train_stream)
    per_step = args.batch_size * s.world_size
    logger = None
    if s.master:
        logger = common.JsonlLogger(os.path.join(args.out, "jjepa.jsonl"),
                                    resume_step=start_step or None)
    bar = common.progress_bar(total, per_step, start_step, s.master)
    stats = {}
    # jets of this process with no target (too few subjets), summed on the device: no sync
    dropped = torch.zeros((), dtype=torch.long, device=s.device)
    seen = 0
    t0 = time.perf_counter()
    # --- the flat loop: 1. batch + masks  2. forward  3. backward + step  4. EMA update
    for step, epoch, batch in common.train_batches(train_stream, s.device, args.epochs,
                                                   steps=args.steps, start_step=start_step):
        gen = common.generator(args.seed, "masks", s.rank, step)
        masks = sample_targets(batch["idx"], args, gen)
        dropped += (~masks["tgt_valid"].any(1)).sum()
        seen += len(masks["tgt_valid"])
        lr = common.lr_at(step, total, warmup, args.lr)
        common.set_lr(optimizer, lr)
        with s.ctx:
            loss = model(**encoder_inputs(batch, cfg), p4=batch["p4"], valid=batch["valid"],
                         **masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        ema_update(raw_model.target_encoder, raw_model.encoder, step, total, args.ema_start)
        bar.update(per_step)
        t1 = time.perf_counter()
        dt = t1 - t0
        t0 = t1
        done = step + 1
        if done % args.log_every == 0 or done % eval_every == 0 or done == total:
            common.check_finite(loss, step, f"{args.data} train")  # every rank: none waits
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if s.master and done % args.log_every == 0:
                bar.write(f"step {done}/{total} (epoch {epoch}) loss {loss.item():.4f} "
                          f"lr {lr:.2e} dt {1e3 * dt:.0f} ms")
        if s.master and (done % eval_every == 0 or done == total):
            stats = dict(step=done, loss=loss.item(), lr=lr,
                         **evaluate(raw_model, val_stream, args, cfg, s))
            logger.log(stats)
            bar.write(f"val step {done}: loss {stats['val_loss']:.4f}; EMA encoder: " + ", ".join(
                f"{k} {stats[k]:.3f}" for k in ("paper_cos", "cos", "std", "erank", "kept")))
            common.save_checkpoint(os.path.join(args.out, "jjepa.pt"), method="jjepa", args=args,
                                   model=raw_model, encoder=raw_model.target_encoder,
                                   encoder_config=cfg, optimizer=optimizer, step=done,
                                   data=train_stream.identity)
            t0 = time.perf_counter()  # the next dt leaves the evaluation out
    bar.close()
    if s.master:
        print(f"jjepa: {int(dropped)} of the {seen} training jets drawn (rank 0) had fewer than "
              f"max(2, --min-subjets {args.min_subjets}) non-empty subjets: no target, no loss")
    # the one probe protocol: fit on a bounded train sample, score on val
    if s.master and common.probe_possible(train_stream):
        fit = stream("train", n_jets=min(args.n_eval or 20_000, train_stream.n),
                     shuffle=False, drop_last=False)
        embed = functools.partial(common.embed_stream, raw_model.target_encoder, device=s.device,
                                  ctx=s.ctx, inputs=functools.partial(encoder_inputs, cfg=cfg))
        z_fit, y_fit = embed(stream=fit)
        z_val, y_val = embed(stream=val_stream)
        probe = common.linear_probe(z_fit, y_fit, z_val, y_val)
        stats.update({f"probe_{k}": v for k, v in probe.items() if k != "per_class"})
        print(f"linear probe, EMA encoder (fit on {len(y_fit)} train jets, scored on "
              f"{len(y_val)} val jets): acc {probe['acc']:.4f} auc {probe['auc']:.4f} "
              f"1/eps_B(0.5) {probe['rej50']:.1f}")
    common.cleanup(s)
    return stats


if __name__ == "__main__":
    train(get_args())
