# --- model blocks: a "ParT-lite" particle transformer --------------------------
# Particle Transformer (ParT, arXiv 2202.03772): per-particle embedding MLP, pairwise
# features of the two 4-vectors embedded into one additive attention bias per head (computed
# once, shared by every block), pre-norm attention blocks with the extra NormFormer norms ParT
# uses, then class-attention blocks where a CLS token reads the particles. Written here from
# the paper; the "part" preset has ParT's published size.
#
# Padding: the data comes valid-first, so a batch can be cut to its longest jet. That cut
# needs a host sync (.item()), so it lives OUTSIDE forward: call trim_batch(...) in the
# training loop / collate step; forward itself only masks, and never syncs or breaks graphs.
# torch.compile then builds one static graph per length bucket (8 buckets at n_max = 128 with
# multiple = 16; measured: N is specialised, so dynamic shapes do not merge them). Train and
# eval mode are separate graphs too: 16 in all, so raise torch._dynamo.config.recompile_limit
# (default 8) or compile with fewer buckets, else dynamo silently falls back to eager.
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["pair_features", "EncoderConfig", "ENCODER_PRESETS", "Encoder", "Mlp", "Block",
           "ClassBlock", "attention_bias", "trim_batch", "roc_metrics"]

_EPS = 1e-8          # clamp before every log: ln(1e-8) = -18.4 stays finite in fp32
_MASK = -1e4         # additive mask for padded keys: finite (no NaN for empty rows), exp() = 0


def _pair_feats(a, b):
    """ParT's pair features of 4-vectors a, b (..., 4) = (px, py, pz, E), broadcast: (..., 4)."""
    a, b = a.float(), b.float()  # logs of small differences: always fp32, also under autocast
    pt_a, pt_b = torch.hypot(a[..., 0], a[..., 1]), torch.hypot(b[..., 0], b[..., 1])

    def rapidity(v):
        return 0.5 * torch.log((v[..., 3] + v[..., 2]).clamp(min=_EPS)
                               / (v[..., 3] - v[..., 2]).clamp(min=_EPS))

    dy = rapidity(a) - rapidity(b)
    dphi = torch.remainder(torch.atan2(a[..., 1], a[..., 0]) - torch.atan2(b[..., 1], b[..., 0])
                           + math.pi, 2 * math.pi) - math.pi
    delta = torch.sqrt(dy ** 2 + dphi ** 2)
    pt_min = torch.minimum(pt_a, pt_b)
    s = a + b
    m2 = s[..., 3] ** 2 - (s[..., :3] ** 2).sum(-1)
    return torch.stack([torch.log(delta.clamp(min=_EPS)),                      # ln Delta
                        torch.log((pt_min * delta).clamp(min=_EPS)),          # ln kT
                        torch.log((pt_min / (pt_a + pt_b).clamp(min=_EPS)).clamp(min=_EPS)),  # ln z
                        torch.log(m2.clamp(min=_EPS))], dim=-1)                # ln m^2


def pair_features(p4, valid):
    """p4 (B, N, 4), valid (B, N) -> (B, N, N, 4) fp32: ln Delta (rapidity-phi distance), ln kT,
    ln z, ln m^2; zero where either particle is padding. The diagonal (i, i) is kept, as in ParT."""
    pair_valid = valid[:, :, None] & valid[:, None, :]                          # (B, N, N)
    return _pair_feats(p4[:, :, None], p4[:, None, :]) * pair_valid[..., None]


def attention_bias(valid, pair=None, dtype=torch.float32):
    """Additive attention mask (B, H or 1, N, N) from valid (B, N) and an optional pair bias
    (B, N, N, H). Padded keys get -1e4 rather than -inf, so even an all-padded row has a finite
    softmax (uniform over garbage that is masked downstream) instead of NaN."""
    key = torch.where(valid, 0.0, _MASK).to(dtype)[:, None, None, :]            # (B, 1, 1, N)
    return key if pair is None else pair.permute(0, 3, 1, 2).to(dtype) + key    # (B, H, N, N)


# --- building blocks ------------------------------------------------------------
class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU -> LayerNorm (NormFormer, as ParT) -> Linear."""

    def __init__(self, dim, hidden, out=None, dropout=0.0):
        super().__init__()
        self.fc1, self.norm = nn.Linear(dim, hidden), nn.LayerNorm(hidden)
        self.fc2, self.drop = nn.Linear(hidden, out or dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.norm(self.drop(F.gelu(self.fc1(x)))))


class _Attention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"EncoderConfig: dim={dim} must be divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, q_in, kv_in, bias):
        B, Nq, C = q_in.shape
        q = self.q(q_in).view(B, Nq, self.heads, -1).transpose(1, 2)           # (B, H, Nq, D)
        k, v = self.kv(kv_in).view(B, kv_in.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class Block(nn.Module):
    """Pre-norm self-attention block. bias: additive (B, H or 1, N, N) from attention_bias()."""

    def __init__(self, dim, heads, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.mlp, self.drop = Mlp(dim, mlp_ratio * dim, dropout=dropout), nn.Dropout(dropout)

    def forward(self, x, bias):
        h = self.norm1(x)
        x = x + self.drop(self.norm2(self.attn(h, h, bias)))  # norm2: ParT's post-attention norm
        return x + self.drop(self.mlp(self.norm3(x)))


class ClassBlock(Block):
    """Class attention (CaiT): cls (B, 1, C) attends to [cls, tokens]; tokens are not updated.
    bias (B, 1, 1, 1 + N); the CLS key is always valid, so no row is ever empty."""

    def forward(self, cls, tokens, bias):
        h = self.norm1(torch.cat([cls, tokens], dim=1))
        cls = cls + self.drop(self.norm2(self.attn(h[:, :1], h, bias)))
        return cls + self.drop(self.mlp(self.norm3(cls)))


# --- the encoder ----------------------------------------------------------------
@dataclass
class EncoderConfig:
    in_dim: int = 7                 # per-token input features (7 "kin", 17 "full")
    dim: int = 64                   # token width
    heads: int = 4
    depth: int = 4                  # particle (self-attention) blocks
    cls_depth: int = 2              # class-attention blocks giving the jet vector
    pair_dim: tuple = (32, 32)      # pair-bias MLP hidden widths; () = no pair bias, p4 unused
    mlp_ratio: int = 4
    dropout: float = 0.0            # attention, residual and MLP dropout of the particle blocks
    embed_hidden: tuple = (64,)     # embedding MLP: in_dim -> *embed_hidden -> dim


ENCODER_PRESETS = {
    "small": EncoderConfig(dim=64, heads=4, depth=3, cls_depth=1, pair_dim=(32, 32), embed_hidden=(64,)),
    # ParT (arXiv 2202.03772): embed (128, 512, 128), 8 heads, 8 + 2 blocks, pair embed 64 x 3,
    # dropout 0.1 in the particle blocks
    "part": EncoderConfig(in_dim=17, dim=128, heads=8, depth=8, cls_depth=2, pair_dim=(64, 64, 64),
                          embed_hidden=(128, 512), dropout=0.1),
}


def _norm_linear_gelu(dims):
    """LayerNorm -> Linear -> GELU per step (ParT's embedding): stable on unscaled inputs."""
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.LayerNorm(a), nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """forward(x (B, N, in_dim), valid (B, N) bool, p4 (B, N, 4) or None) ->
    tokens (B, N, C) (final norm applied, zero at padding), valid (B, N), jet (B, C).
    Works for any token set (particles, subjets). Trim padding beforehand with trim_batch()."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.cls_depth < 1:
            raise ValueError("EncoderConfig: cls_depth must be >= 1 (the jet vector is the CLS output)")
        self.cfg = cfg
        self.embed = _norm_linear_gelu((cfg.in_dim, *cfg.embed_hidden, cfg.dim))
        pd = tuple(cfg.pair_dim)
        if pd:  # pointwise MLP on the 4 pair features -> one bias per head
            layers = [nn.Linear(4, pd[0])]
            for a, b in zip(pd[:-1], pd[1:]):
                layers += [nn.LayerNorm(a), nn.GELU(), nn.Linear(a, b)]
            self.pair_embed = nn.Sequential(*layers, nn.LayerNorm(pd[-1]), nn.GELU(),
                                            nn.Linear(pd[-1], cfg.heads))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        # class blocks without dropout, as ParT
        self.cls_blocks = nn.ModuleList(ClassBlock(cfg.dim, cfg.heads, cfg.mlp_ratio)
                                        for _ in range(cfg.cls_depth))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm = nn.LayerNorm(cfg.dim)

    def pair_bias(self, p4, valid):
        """(B, N, N, H). The features are symmetric in (i, j): embed only the N(N+1)/2 pairs
        i <= j, then gather them back into the square (halves the dominant cost)."""
        N = valid.shape[1]
        i, j = torch.triu_indices(N, N, device=valid.device)                   # (P,)
        f = _pair_feats(p4[:, i], p4[:, j]) * (valid[:, i] & valid[:, j])[..., None]  # (B, P, 4)
        e = self.pair_embed(f)                                                  # (B, P, H)
        # index of pair (a, b), a <= b, in triu order: rows before a hold a*N - a(a-1)/2 pairs
        r = torch.arange(N, device=valid.device)
        lo, hi = torch.minimum(r[:, None], r[None]), torch.maximum(r[:, None], r[None])
        tri = lo * N - lo * (lo - 1) // 2 + (hi - lo)                            # (N, N)
        return e[:, tri.flatten()].view(e.shape[0], N, N, -1)

    def forward(self, x, valid, p4=None):
        B, N, _ = x.shape
        x = torch.where(valid[..., None], x, 0.0)  # padding may hold anything, even NaN
        x = self.embed(x)                                                       # (B, N, C)
        pair = None
        if self.cfg.pair_dim:
            if p4 is None:
                raise ValueError("Encoder: pair_dim is set, so forward needs p4 (B, N, 4)")
            pair = self.pair_bias(torch.where(valid[..., None], p4, 0.0), valid)
        bias = attention_bias(valid, pair, x.dtype)                             # (B, H|1, N, N)
        for block in self.blocks:
            x = block(x, bias)
        cls_valid = torch.cat([valid.new_ones(B, 1), valid], dim=1)
        cls_bias = attention_bias(cls_valid, None, x.dtype)                     # (B, 1, 1, 1 + N)
        cls = self.cls_token.expand(B, -1, -1)
        for block in self.cls_blocks:
            cls = block(cls, x, cls_bias)
        tokens = self.norm(x) * valid[..., None]
        return tokens, valid, self.norm(cls[:, 0])


def trim_batch(valid, *tensors, multiple=16):
    """Cut the particle axis (dim 1) of valid and tensors to the longest jet, rounded up to
    `multiple` (at least one bucket, at most N), so compile sees few shapes. Assumes valid-first
    order. Reads the length on the host (a sync): call it OUTSIDE the compiled forward."""
    n = int(valid.sum(1).max()) if valid.shape[0] else 0
    n = min(valid.shape[1], max(1, math.ceil(n / multiple)) * multiple)
    return (valid[:, :n], *(t[:, :n] for t in tensors))


# --- metrics ----------------------------------------------------------------------
def _binary_roc(y, s):
    """y (N,) bool signal, s (N,) score (higher = more signal-like) -> auc, rej50, rej30.
    Ties are one ROC point (the straight segment = random tie breaking); AUC from average ranks."""
    n_s, n_b = int(y.sum()), int((~y).sum())
    if n_s == 0 or n_b == 0:
        return dict(auc=float("nan"), rej50=float("nan"), rej30=float("nan"))
    uniq, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]        # 1-based average ranks
    auc = (rank[y].sum() - n_s * (n_s + 1) / 2.0) / (n_s * n_b)
    # ROC points, threshold sweeping from the highest score down, one point per distinct score
    sig = np.bincount(inv, weights=y, minlength=len(uniq))[::-1]
    bkg = counts[::-1] - sig
    eff_s = np.concatenate([[0.0], np.cumsum(sig) / n_s])
    eff_b = np.concatenate([[0.0], np.cumsum(bkg) / n_b])
    out = dict(auc=float(auc))
    for key, target in (("rej50", 0.5), ("rej30", 0.3)):
        # first point reaching the target: an exact hit takes the lowest eps_B at that eps_S,
        # otherwise interpolate on the segment from the last point below the target
        k = np.searchsorted(eff_s, target, side="left")
        if eff_s[k] == target:
            eb = eff_b[k]
        else:
            t = (target - eff_s[k - 1]) / (eff_s[k] - eff_s[k - 1])
            eb = eff_b[k - 1] + t * (eff_b[k] - eff_b[k - 1])
        out[key] = float("inf") if eb == 0 else float(1.0 / eb)
    return out


def roc_metrics(y, score):
    """y (N,) int labels; score (N,) = P(signal), or (N, C) class probabilities (softmax).
    Binary (1-D score or C = 2): dict(acc, auc, rej50, rej30), rej = 1/eps_B at eps_S = 0.5, 0.3
    interpolated linearly on the ROC curve; rej is float("inf") when no background passes at
    that signal efficiency, nan when a class is missing. A 1-D score counts as signal above 0.5.
    Multi-class: acc = argmax accuracy, per_class = {c: dict(auc, rej50, rej30)} for each class
    c >= 1 against QCD (class 0) with the discriminant P_c / (P_c + P_0) on jets of classes c
    and 0 (as ParT), and auc, rej50, rej30 = macro means over those classes."""
    y, score = np.asarray(y).astype(np.int64), np.asarray(score, dtype=np.float64)
    if score.ndim == 1 or score.shape[1] == 2:
        if score.ndim == 1:
            s, pred = score, (score > 0.5).astype(np.int64)
        else:  # P1 - P0 ranks like P1 for probabilities and like the softmax for logits
            s, pred = score[:, 1] - score[:, 0], score.argmax(1)
        return dict(acc=float((pred == y).mean()), **_binary_roc(y == 1, s))
    if (score < 0).any():
        raise ValueError("roc_metrics: multi-class scores must be probabilities (apply softmax)")
    out = dict(acc=float((score.argmax(1) == y).mean()), per_class={})
    for c in range(1, score.shape[1]):
        sel = (y == c) | (y == 0)
        s = score[sel, c] / np.maximum(score[sel, c] + score[sel, 0], 1e-30)
        out["per_class"][c] = _binary_roc(y[sel] == c, s)
    for key in ("auc", "rej50", "rej30"):
        out[key] = float(np.mean([m[key] for m in out["per_class"].values()]))
    return out
