"""J-JEPA: a jet is reclustered into subjets; an encoder that sees only some of them (the
context) must let a small predictor guess the representations that a slowly moving copy of
itself (the EMA target encoder) gives to the others (the targets). Nothing is reconstructed in
input space and no augmentation is needed. Paper: J-JEPA, arXiv 2412.05333.

What is done here, and where it differs from the paper's public code (whose bugs are avoided):
- Subjets: C/A R=0.2, the 20 leading subjets x 30 particles (flags), clustered once per data
  set by common.load_subjets (vectorised fastjet, cached on disk). The encoder reads the jet's
  ParT-standardised particle features x (B, N, F) plus an index idx (B, S, P) of each subjet's
  particles into N: fixed-size tensors, so nothing is copied per subjet in memory. Jets with
  few subjets are kept unless --min-subjets says otherwise (the paper drops those below 10).
- Subjet embedding layer (SEL, --sel): "mlp" flattens a subjet's P x F particles; "attn" lets
  each particle attend to the particles of its own subjet, then pools each subjet with class
  attention (the paper's better variant). It runs on the jet's particle axis with a
  same-subjet mask rather than on S x P mostly-empty slots: the same function, ~6x fewer tokens.
- Subjet position = (deta, dphi, log pT_subjet/pT_jet) relative to the jet axis, computed once
  and never modified (the official code shifted positions in place, twice): translations in
  (eta, phi) and the jet-pT window drop out, deta uses the particles' JetClass sign convention,
  dphi is wrapped (the official code did not wrap). Energy and multiplicity of a subjet are
  already visible to the SEL. Positions are embedded (small MLP) for encoder and predictor.
- The context encoder sees ONLY the context subjets: targets and empty subjets are removed from
  the attention keys and the SEL never mixes subjets, so no target information reaches a
  context token (the official code encodes the whole jet and selects context tokens afterwards:
  a leak). Every jet with >= 2 subjets keeps >= 1 context and >= 1 target.
- Targets: round(30%) of each jet's non-empty subjets, drawn on the CPU with a seeded generator
  for the whole batch at once; K = round(0.3 S) target slots per jet (unused ones flagged), so
  the predictor gathers with fixed-size indices and its padding mask is built in the same
  order as its tokens (the official predictor's mask was misaligned for batch > 1).
- Target encoder: EMA copy, eval mode, no grad, sees all subjets; loss on its layer-normed
  outputs. Momentum cosine from --ema-start (0.996) to 1, advanced exactly once per step (the
  official code advanced it twice). No dropout anywhere, so nothing to switch off at eval.
- The checkpoint's encoder (for finetune.py) and the end-of-run linear probe use the EMA target
  encoder; its jet vector is the masked mean of its subjet tokens.
- Presets: AE-SjT-T has the paper's 4.1M encoder parameters; SjT-T has 2.35M here vs 2.1M
  (its MLP ratio is not known to us: 3 gives 2.35M, 2 gives 1.85M). Both predictors 0.52M.

GPU (paper size, attention SEL; pretrain on the 10-class sample):
  python jjepa.py --preset AE-SjT-T --data pythia --data-dir data/pythia10 --epochs 50
CPU (the README quickstart: small preset, embedded default data, a few minutes on 2 cores):
  python jjepa.py
Tiny CPU check (seconds):
  python jjepa.py --n-jets 512 --epochs 1 --batch-size 64 --probe-jets 256
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

# --- config ---------------------------------------------------------------------------

# dim/depth/heads: subjet transformer; sel_*: subjet embedding layer; pred_*: predictor
PRESETS = {
    "small": dict(dim=64, depth=4, heads=4, mlp_ratio=4, sel="attn", sel_dim=32, sel_depth=1,
                  pred_dim=32, pred_depth=2, pred_heads=4),
    "SjT-T": dict(dim=96, depth=24, heads=16, mlp_ratio=3, sel="mlp", sel_dim=256, sel_depth=0,
                  pred_dim=64, pred_depth=12, pred_heads=4),
    "AE-SjT-T": dict(dim=96, depth=24, heads=16, mlp_ratio=3, sel="attn", sel_dim=128,
                     sel_depth=8, pred_dim=64, pred_depth=12, pred_heads=4),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(epochs=4, batch_size=256, lr=1e-3, weight_decay=0.01, warmup=20)
    g = p.add_argument_group("subjets")
    g.add_argument("--subjet-algorithm", default="ca", choices=["ca", "kt", "antikt"],
                   help="reclustering algorithm for the subjets")
    g.add_argument("--subjet-r", type=float, default=0.2, help="subjet radius")
    g.add_argument("--n-subjets", type=int, default=20, help="leading subjets kept per jet")
    g.add_argument("--n-per-subjet", type=int, default=30, help="leading particles kept per subjet")
    g.add_argument("--min-subjets", type=int, default=0,
                   help="drop jets with fewer non-empty subjets (the paper uses 10)")
    g = p.add_argument_group("model (None = from --preset)")
    g.add_argument("--preset", default="small", choices=list(PRESETS))
    g.add_argument("--sel", choices=["mlp", "attn"], help="subjet embedding layer")
    g.add_argument("--dim", type=int, help="subjet token width")
    g.add_argument("--depth", type=int, help="subjet transformer blocks")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--pred-dim", type=int, help="predictor width (narrow, as in the paper)")
    g.add_argument("--pred-depth", type=int, help="predictor blocks")
    g = p.add_argument_group("J-JEPA")
    g.add_argument("--target-frac", type=float, default=0.3,
                   help="fraction of a jet's non-empty subjets used as targets")
    g.add_argument("--ema-start", type=float, default=0.996,
                   help="EMA momentum at step 0; cosine schedule to 1 at the last step")
    g.add_argument("--loss", default="mse", choices=["mse", "smooth-l1"])
    g.add_argument("--var-weight", type=float, default=0.0,
                   help="VICReg-style variance term on the context jet representation (0 = off)")
    g.add_argument("--cov-weight", type=float, default=0.0,
                   help="VICReg-style covariance term on the context jet representation (0 = off)")
    g.add_argument("--probe-jets", type=int, default=4000,
                   help="training jets used to fit the end-of-run linear probe (0 = no probe)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0.0 < args.target_frac < 1.0:
        raise SystemExit(f"--target-frac must be in (0, 1), got {args.target_frac}")
    return args


def encoder_config(args, in_dim):
    keys = ("dim", "depth", "heads", "mlp_ratio", "sel", "sel_dim", "sel_depth",
            "subjet_algorithm", "subjet_r", "n_subjets", "n_per_subjet")
    return dict(in_dim=in_dim, **{k: getattr(args, k) for k in keys})


# --- subjet inputs ----------------------------------------------------------------------

def subjet_positions(sub_p4, jet):
    """(N, S, 4) subjet (px, py, pz, E), (N, 4) jet (pt, eta, phi, E) -> (N, S, 3) float32
    (deta, dphi, log pT_subjet/pT_jet); zero for empty subjets."""
    pt = np.hypot(sub_p4[..., 0], sub_p4[..., 1])
    empty = pt <= 0
    pt = np.where(empty, 1.0, pt)
    eta = np.arcsinh(sub_p4[..., 2] / pt)
    deta = common.signed_deta(eta, jet[:, 1:2])  # the particles' (JetClass) sign convention
    dphi = common.wrap_phi(np.arctan2(sub_p4[..., 1], sub_p4[..., 0]) - jet[:, 2:3])
    pos = np.stack([deta, dphi, np.log(pt / jet[:, 0:1])], -1)
    return np.where(empty[..., None], 0.0, pos).astype(np.float32)


def encoder_inputs(jets, cfg):
    """What the encoder's forward() takes, as numpy arrays with jets on the first axis."""
    sub = common.load_subjets(jets, algorithm=cfg["subjet_algorithm"], R=cfg["subjet_r"],
                              n_subjets=cfg["n_subjets"], n_per_subjet=cfg["n_per_subjet"])
    # idx < n_max <= 32767: int16 keeps the index 4x smaller than the features it points into
    idx = np.where(sub.valid, sub.idx, -1).astype(np.int16)  # (N, S, P)
    return dict(x=np.asarray(jets.x), idx=idx, pos=subjet_positions(sub.p4, np.asarray(jets.jet)))


# --- the model ---------------------------------------------------------------------------

class SubjetPool(nn.Module):
    """Class attention with one query per subjet: a learned CLS vector reads the particles of
    its own subjet only. (B, N, W) particles, member (B, S, N) -> (B, S, W)."""

    def __init__(self, W, heads):
        super().__init__()
        self.heads = heads
        self.cls = nn.Parameter(torch.zeros(1, 1, W))
        self.norm1, self.norm2 = nn.LayerNorm(W), nn.LayerNorm(W)
        self.q, self.kv, self.proj = nn.Linear(W, W), nn.Linear(W, 2 * W), nn.Linear(W, W)
        self.mlp = common.Mlp(W, 4 * W)

    def forward(self, h, member):
        B, N, W = h.shape
        S = member.shape[1]
        k, v = self.kv(self.norm1(h)).view(B, N, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = self.q(self.cls).view(1, 1, self.heads, -1).transpose(1, 2).expand(B, -1, S, -1)
        bias = torch.where(member, 0.0, -1e4).to(q.dtype)[:, None]  # (B, 1, S, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, S, W/H)
        out = self.cls + self.proj(a.transpose(1, 2).reshape(B, S, W))
        return out + self.mlp(self.norm2(out))


class SubjetEmbedding(nn.Module):
    """SEL: a subjet's particles -> one (dim,) token. 'mlp' flattens the subjet's (P, F)
    particles; 'attn' embeds each particle, lets it attend to the particles of its own subjet,
    then pools each subjet by class attention (SubjetPool). The attention version runs on the
    jet's particle axis with a same-subjet mask instead of on S x P padded slots: the same
    function, on ~100 instead of 600 tokens per jet."""

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
        B, S, P = idx.shape  # x (B, N, F) particles; idx (B, S, P) into N, -1 = padding
        N = x.shape[1]
        pvalid = idx >= 0
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


def position_mlp(dim):
    return nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))


class SubjetEncoder(nn.Module):
    """forward(x (B, n_max, F), idx (B, S, P), pos (B, S, 3), keep (B, S) or None)
    -> tokens (B, S, C), tok_valid (B, S), jet (B, C). Only subjets with keep=True (default:
    all non-empty ones) are visible to attention; tokens elsewhere are zeroed."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        self.sel = SubjetEmbedding(cfg)
        self.pos_embed = position_mlp(cfg["dim"])
        self.blocks = nn.ModuleList(common.Block(cfg["dim"], cfg["heads"], cfg["mlp_ratio"])
                                    for _ in range(cfg["depth"]))
        self.norm = nn.LayerNorm(cfg["dim"])

    def forward(self, x, idx, pos, keep=None):
        idx = idx.long()  # (B, S, P) into the particle axis of x (B, N, F), -1 = padding
        nonempty = (idx >= 0).any(-1)
        tok_valid = nonempty if keep is None else keep & nonempty  # (B, S)
        h = self.sel(x, idx) + self.pos_embed(pos)  # (B, S, C)
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

    def __init__(self, dim, pred_dim, depth, heads, mlp_ratio):
        super().__init__()
        self.inp = nn.Linear(dim, pred_dim)
        self.pos_embed = position_mlp(pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.blocks = nn.ModuleList(common.Block(pred_dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(pred_dim)
        self.out = nn.Linear(pred_dim, dim)

    def forward(self, ctx_tokens, ctx_valid, pos, tgt_idx, tgt_valid):
        S, K = ctx_tokens.shape[1], tgt_idx.shape[1]
        pe = self.pos_embed(pos)  # (B, S, D)
        tgt_pe = torch.gather(pe, 1, tgt_idx[..., None].expand(-1, -1, pe.shape[-1]))  # (B, K, D)
        h = torch.cat([self.inp(ctx_tokens) + pe, self.mask_token + tgt_pe], 1)  # (B, S+K, D)
        bias = common.attention_bias(torch.cat([ctx_valid, tgt_valid], 1), dtype=h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        return self.out(self.norm(h[:, S:S + K]))


def sample_targets(nonempty, frac, K, gen):
    """nonempty (B, S) bool (CPU) -> tgt_idx (B, K) long, tgt_valid (B, K), context (B, S).
    A jet with n non-empty subjets gets round(frac n) targets, at least 1 when n >= 2 and at
    most n - 1, so its context is never empty. All jets at once: random scores, empty subjets
    sorted last, the first n_tgt of the random order are the targets."""
    B, S = nonempty.shape
    n = nonempty.sum(1)
    n_tgt = torch.minimum(torch.floor(frac * n + 0.5).clamp(min=1), n - 1).clamp(min=0).long()
    score = torch.rand(B, S, generator=gen).masked_fill(~nonempty, 2.0)
    tgt_idx = score.argsort(dim=1, stable=True)[:, :K]
    tgt_valid = torch.arange(K) < n_tgt[:, None]
    target = torch.zeros(B, S, dtype=torch.bool).scatter_(1, tgt_idx, tgt_valid)
    return tgt_idx, tgt_valid, nonempty & ~target


class JJEPA(nn.Module):
    """Online encoder + predictor (trained) and the EMA target encoder (not trained)."""

    def __init__(self, cfg, pred_dim, pred_depth, pred_heads, loss="mse",
                 var_weight=0.0, cov_weight=0.0):
        super().__init__()
        self.encoder = SubjetEncoder(cfg)
        self.predictor = Predictor(cfg["dim"], pred_dim, pred_depth, pred_heads, cfg["mlp_ratio"])
        self.target_encoder = copy.deepcopy(self.encoder).eval().requires_grad_(False)
        self.loss, self.var_weight, self.cov_weight = loss, var_weight, cov_weight

    def train(self, mode=True):
        super().train(mode)
        self.target_encoder.eval()  # always: the teacher never uses train-mode behaviour
        return self

    def forward(self, x, idx, pos, tgt_idx, tgt_valid, context):
        # 1. targets: EMA encoder on all subjets, layer-normed, gathered at the target slots
        with torch.no_grad():
            t = self.target_encoder(x, idx, pos)[0]
            t = F.layer_norm(t.float(), t.shape[-1:])
            t = torch.gather(t, 1, tgt_idx[..., None].expand(-1, -1, t.shape[-1]))  # (B, K, C)
        # 2. context encoder (context subjets only) + predictor
        tokens, ctx_valid, jet = self.encoder(x, idx, pos, keep=context)
        pred = self.predictor(tokens, ctx_valid, pos, tgt_idx, tgt_valid).float()
        if self.loss == "mse":
            err = (pred - t).pow(2).mean(-1)
        else:
            err = F.smooth_l1_loss(pred, t, reduction="none").mean(-1)
        loss = (err * tgt_valid).sum() / tgt_valid.sum().clamp(min=1)
        if self.var_weight or self.cov_weight:  # optional anti-collapse terms (VICReg)
            z = jet.float() - jet.float().mean(0)
            std = (z.var(0) + 1e-4).sqrt()
            cov = (z.T @ z) / max(z.shape[0] - 1, 1)
            off_diag = cov.pow(2).sum() - cov.diagonal().pow(2).sum()
            loss = loss + self.var_weight * F.relu(1 - std).mean() \
                + self.cov_weight * off_diag / z.shape[1]
        return loss


def ema_momentum(step, total_steps, start):
    return 1.0 - (1.0 - start) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target, online, momentum):
    """target <- momentum * target + (1 - momentum) * online, for every parameter."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(t, o, 1.0 - momentum)


# --- evaluation ------------------------------------------------------------------------------

# --- training ------------------------------------------------------------------------------

def load_split(args, cfg, split, n_jets):
    """Jets of one split -> (dict of encoder-input tensors on the CPU, labels, seconds spent)."""
    t0 = time.perf_counter()
    jets = common.load_jets(args.data, args.data_dir, split=split, n_jets=n_jets, n_max=args.n_max)
    inputs = encoder_inputs(jets, cfg)
    n_sub = (inputs["idx"] >= 0).any(-1).sum(1)  # non-empty subjets per jet
    keep = n_sub >= args.min_subjets
    if not keep.any():
        raise SystemExit(f"--min-subjets {args.min_subjets}: no {split} jet has that many subjets")
    data = {k: torch.from_numpy(np.ascontiguousarray(v[keep])) for k, v in inputs.items()}
    return data, torch.from_numpy(np.asarray(jets.y)[keep]), time.perf_counter() - t0


def take(data, idx, device):
    """One batch on the device; the particle axis of x is cut after the last particle any kept
    subjet reads (rounded up to 16, so compile sees few shapes): ~100 of 128 on JetClass-like jets."""
    batch = {k: v[idx] for k, v in data.items()}
    n = min(batch["x"].shape[1], -(-(int(batch["idx"].max()) + 1) // 16) * 16)
    batch["x"] = batch["x"][:, :n]
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, data, args, device, ctx):
    """Validation loss on masks drawn from a fixed seed (comparable from eval to eval) and the
    collapse diagnostics of the EMA encoder's jet representations."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    K = max(1, math.floor(args.target_frac * args.n_subjets + 0.5))
    losses = []
    for i in range(0, len(data["idx"]), args.batch_size):
        batch = {k: v[i:i + args.batch_size] for k, v in data.items()}
        tgt_idx, tgt_valid, context = sample_targets((batch["idx"] >= 0).any(-1), args.target_frac, K, gen)
        with ctx:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, tgt_idx=tgt_idx.to(device),
                         tgt_valid=tgt_valid.to(device), context=context.to(device))
        losses.append(loss.item())
    model.train()
    z = common.embed(model.target_encoder, data, device, batch_size=args.batch_size)
    return dict(val_loss=float(np.mean(losses)), **common.collapse_stats(z))


def train(args):
    s = common.setup(args)
    device = s.device
    # --- data: jets -> subjets (clustered once, then cached on disk by the data layer)
    cfg = encoder_config(args, in_dim=None)
    train_data, y_train, t_train = load_split(args, cfg, "train", args.n_jets)
    val_data, y_val, t_val = load_split(args, cfg, "val", args.n_eval)
    cfg["in_dim"] = train_data["x"].shape[-1]
    nonempty = (train_data["idx"] >= 0).any(-1)  # (N, S): masks are drawn from this, on the CPU
    n, per_step = len(y_train), args.batch_size * s.world_size
    steps_per_epoch = n // per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} x {s.world_size} processes needs more "
                         f"than the {n} training jets: lower it or raise --n-jets")
    total_steps = args.epochs * steps_per_epoch
    if s.master:
        print(f"jjepa: {n} train / {len(y_val)} val jets, subjets ready in {t_train + t_val:.1f} s, "
              f"{total_steps} steps on {device}, git {common.git_hash()}, torch {torch.__version__}")
    # --- model, optimizer
    raw_model = JJEPA(cfg, args.pred_dim, args.pred_depth, args.pred_heads, args.loss,
                      args.var_weight, args.cov_weight).to(device)
    if s.master:
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        print(f"encoder {count(raw_model.encoder):.2f}M params (preset {args.preset}, sel "
              f"{args.sel}), predictor {count(raw_model.predictor):.2f}M")
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    # masks from their own CPU generator: CPU and GPU runs draw the same targets
    mask_gen = torch.Generator().manual_seed(args.seed * 1000 + s.rank)
    step = 0
    if args.resume:
        step = common.resume_from(args.resume, raw_model, optimizer, {"masks": mask_gen})
    model = common.wrap_model(raw_model, s)
    K = max(1, math.floor(args.target_frac * args.n_subjets + 0.5))  # fixed number of target slots
    eval_every = args.eval_every or steps_per_epoch
    logger = common.JsonlLogger(os.path.join(args.out, "jjepa.jsonl")) if s.master else None
    times = dict(batch=0.0, masks=0.0, forward=0.0, backward=0.0, ema=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start_step, order, stats = step, None, {}
    # --- the flat loop: 1. batch + masks  2. forward (target, context, predictor)
    #     3. backward + step  4. EMA update of the target encoder
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        if order is None or i == 0:  # the order depends on (seed, epoch) only: resumable
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        t0 = time.perf_counter()
        idx = order[i * per_step + s.rank * args.batch_size:][:args.batch_size]
        batch = take(train_data, idx, device)
        t1 = time.perf_counter()
        tgt_idx, tgt_valid, context = sample_targets(nonempty[idx], args.target_frac, K, mask_gen)
        masks = dict(tgt_idx=tgt_idx, tgt_valid=tgt_valid, context=context)
        masks = {k: v.to(device, non_blocking=True) for k, v in masks.items()}
        t2 = time.perf_counter()
        lr = common.lr_at(step, total_steps, args.warmup, args.lr)
        common.set_lr(optimizer, lr)
        with s.ctx:
            loss = model(**batch, **masks)
        sync()
        t3 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        sync()
        t4 = time.perf_counter()
        ema_update(raw_model.target_encoder, raw_model.encoder,
                   ema_momentum(step, total_steps, args.ema_start))
        sync()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.perf_counter() - t4)):
            times[key] += dt
        step += 1
        if s.master and (step % eval_every == 0 or step == total_steps):
            stats = evaluate(raw_model, val_data, args, device, s.ctx)
            stats = dict(step=step, loss=loss.item(), lr=lr, **stats)
            logger.log(stats)
            print(f"step {step}/{total_steps} loss {stats['loss']:.4f} val {stats['val_loss']:.4f} "
                  f"cos {stats['cos']:.3f} std {stats['std']:.3f} erank {stats['erank']:.1f} lr {lr:.2e}")
            # the encoder finetune.py reads is the EMA target encoder
            common.save_checkpoint(os.path.join(args.out, "jjepa.pt"), method="jjepa", args=args,
                                   model=raw_model, encoder=raw_model.target_encoder,
                                   encoder_config=cfg, optimizer=optimizer, step=step,
                                   generators={"masks": mask_gen})
    if not s.master:
        common.cleanup(s)
        return {}
    # --- throughput and the linear probe
    seconds = sum(times.values())
    stats["jets_per_s"] = (step - start_step) * per_step / max(seconds, 1e-9)
    print(f"{stats['jets_per_s']:.0f} jets/s; time per step: " + ", ".join(
        f"{k} {1e3 * v / max(step - start_step, 1):.1f} ms ({100 * v / max(seconds, 1e-9):.0f}%)"
        for k, v in times.items()))
    if args.probe_jets > 0:
        m = min(args.probe_jets, n)
        # a random subset: the jets come class by class (file order), so a prefix would not do
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:m]
        z_fit = common.embed(raw_model.target_encoder, {k: v[pick] for k, v in train_data.items()},
                             device, batch_size=args.batch_size)
        z_val = common.embed(raw_model.target_encoder, val_data, device, batch_size=args.batch_size)
        probe = common.linear_probe(z_fit, y_train[pick], z_val, y_val)
        stats.update({f"probe_{k}": v for k, v in probe.items() if k != "per_class"})
        print(f"linear probe ({m} train jets -> {len(y_val)} val jets): acc {probe['acc']:.4f} "
              f"auc {probe['auc']:.4f} 1/eps_B(0.5) {probe['rej50']:.1f}")
    common.cleanup(s)
    return stats


if __name__ == "__main__":
    train(get_args())
