"""Masked particle modelling (MPM): pretrain a jet encoder by hiding some particles and
predicting them from the rest (v1 arXiv 2401.13537; v2 arXiv 2409.12589, code mattcleigh/jetssl).

Idea: BERT for a set of continuous particles. A particle's token is its nearest K-means centroid
(fitted on the standardised targets); the loss is the cross-entropy of the masked particles'
tokens. Identical mask tokens in a set cannot be told apart, so the k-th masked particle in pT
order is named by its rank k. Two styles (--style):
- bert (v1): the encoder reads the whole jet with a learned mask token at every masked slot; a
  head reads the encoder's output at those slots plus the jet vector. --order says where pT order
  enters: none; input (a learned embedding of each slot's pT rank in the jet added to every
  encoder input token, mask tokens included); head (learned vector k added at the head to the
  k-th masked particle; v1's best). v1's probe (JetClass, VQ-VAE tokens): head 56.8%, none
  54.1%, input 53.4%; K-means tokens, order at the head: 56.2%.
- mae (v2, default): the masked particles are removed from the encoder; a small decoder reads
  the encoder outputs plus one learned "null" token per masked particle (the k-th gets vector k:
  order at the head) and predicts its token; a particle-ID task (type x charge), an ID embedding
  at the input and register tokens complete it.

What the inputs tell about the masked particles (--frame, --drop-features):
- --frame visible (default): each visible particle's deta, dphi, log pT/pT_axis, log E/E_axis and
  distance to the axis are measured from the visible particles' summed four-vector; the targets
  (and the K-means fit) use the same axis: "where is the hidden particle relative to what you can
  see". Closed: the visible particles' features do not depend on the masked particles (a test
  changes them and compares bitwise), so neither the jet axis's balance (sum of pT sin dphi over
  all particles is 0: the masked particles' pT-weighted angular centroid) nor pT_jet and E_jet
  (the masked totals) reach the encoder.
- --frame jet: the data layer's jet axis, which includes the masked particles: the centroid
  above leaks. pt_log - logptrel = log pT_jet and e_log - logerel = log E_jet give the masked
  totals: the default --drop-features logptrel,logerel closes that part (in both frames).
- Not closed, by design: the number of masked particles (one query or mask token each), hence the
  jet's multiplicity; each query's rank among the masked particles (order at the head); with
  --order input, a mask token's slot rank in the whole jet, which places its pT between those of
  its visible neighbours (as in v1); and what the sample's selection fixes (its jet pT window).
  Fine-tuning reads the data layer's features (jet axis): with nothing hidden, the visible axis
  is the constituents' sum, which is the jet axis up to the --n-max cut.

--preset mpm-v1, v1 as far as K-means goes: bert style, order at the head, mask 30%, K = 512,
plain cross-entropy (our reading: v1 names no smoothing) and no ID task (a v2 addition). v1's
model size and optimiser are not in our notes: the flags' defaults stay. --preset mpm-v2, v2
as far as published: mae style, encoder 512 wide, 8 blocks, 8 heads, 8 registers; decoder
128 x 4; mask 0.4; K = 16,384, label smoothing 0.1; ID weight 0.3; AdamW lr 1e-3, wd 1e-5, 50k
warm-up steps, batch 1000, 1M steps; inputs pT, d0, d0err, dz, dzerr, deta, dphi and the ID.
v2 reaches (JetClass, 100M jets): probe 84.0%; fine-tuned 85.0-85.3% vs 84.3% from scratch
(ParT 86.1%); about 68/75/82% at 1k/10k/100k labels (scratch 48/60/76%).

Deviations: ParT's features (--features auto: "kin" on Top Tagging, which has no ID or impact
parameters, else "full"), not quantile-transformed ones; targets are v2's 7 quantities (3 with
"kin"), standardised, with neutral particles' impact parameters 0 (v2's code put fresh noise
there: random labels); common's GELU blocks (no SwiGLU, LayerScale); warm-up then cosine; the
class-attention jet vector is a decoder context token (mae) or added at the head (bert), so
pretraining trains what the probe reads; the probe is fitted after training on detached vectors
(v2's online probe once leaked gradient into the backbone). Jets with fewer than 2 particles
have nothing to mask and see: they are dropped from the training batches and counted.

GPU:  python mpm.py --data jetclass --data-dir data/JetClass --preset mpm-v2
CPU:  OMP_NUM_THREADS=1 python mpm.py --n-jets 2000 --epochs 2 --k 64
      OMP_NUM_THREADS=1 python mpm.py --n-jets 2000 --epochs 2 --preset mpm-v1 --k 64
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config -------------------------------------------------------------------------------------
PRESETS = {  # --preset: a paper's recipe; its values become defaults, explicit flags still win
    "mpm-v1": dict(style="bert", order="head", mask_frac=0.3, k=512, label_smoothing=0.0,
                   id_weight=0.0),
    "mpm-v2": dict(style="mae", order="head", dim=512, depth=8, heads=8, n_registers=8,
                   dec_dim=128, dec_depth=4, mask_frac=0.4, k=16384, label_smoothing=0.1,
                   id_weight=0.3, lr=1e-3, weight_decay=1e-5, warmup=50_000, batch_size=1000,
                   steps=1_000_000, drop_features="e_log,logptrel,logerel,deltaR")}
MIN_PARTICLES = 2  # one to hide and one to see


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=1e-3, weight_decay=1e-5, batch_size=256, n_eval=10000)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a paper's recipe (docstring); explicit flags override its values")
    g = p.add_argument_group("method")
    g.add_argument("--style", choices=["bert", "mae"], default="mae",
                   help="bert (v1): mask tokens inside the encoder; mae (v2): masked particles "
                        "removed, a decoder predicts them")
    g.add_argument("--order", choices=["none", "input", "head"], default="head",
                   help="where the pT rank enters (bert; mae always ranks its decoder queries)")
    g.add_argument("--frame", choices=["visible", "jet"], default="visible",
                   help="axis of the inputs' and targets' angles and ratios: the visible "
                        "particles' (docstring) or the data layer's jet axis")
    g.add_argument("--features", choices=["auto", "kin", "full"], default="auto",
                   help="particle features; auto: kin on toptagging (no ID, no IPs), else full")
    g = p.add_argument_group("masking and targets")
    g.add_argument("--mask-frac", default=0.4,
                   type=common.number_type(float, lambda v: 0 < v < 1, "a fraction in (0, 1)"),
                   help="fraction of each jet's real particles masked (floor(f n), in [1, n - 1])")
    g.add_argument("--k", type=common.positive_int, default=512,
                   help="K-means centroids (v1 512, v2 16384)")
    g.add_argument("--kmeans-jets", type=common.positive_int, default=50_000,
                   help="jets (from random train files) K-means and target scales are fitted on")
    g.add_argument("--kmeans-steps", type=common.positive_int, default=300,
                   help="mini-batch K-means steps")
    g.add_argument("--label-smoothing", default=0.1,
                   type=common.number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   help="of the token and ID cross-entropies (v2: 0.1)")
    g.add_argument("--id-weight", type=common.nonneg_float, default=0.3,
                   help="weight of the particle-ID task (needs 'full' features; 0: off)")
    g.add_argument("--drop-features", default="logptrel,logerel", help="names left out of the "
                   "encoder input; the default closes the conservation shortcut (docstring)")
    g = p.add_argument_group("model (defaults: minutes on a laptop CPU; v2's: --preset mpm-v2)")
    for name, value, what in [("dim", 64, "encoder width"), ("depth", 3, "encoder blocks"),
                              ("heads", 4, "encoder heads"), ("n-registers", 2, "register tokens"),
                              ("dec-dim", 64, "decoder width (mae)"),
                              ("dec-depth", 2, "decoder blocks (mae)"),
                              ("dec-heads", 4, "decoder heads (mae)")]:
        g.add_argument(f"--{name}", default=value, help=what,
                       type=common.nonneg_int if name == "n-registers" else common.positive_int)
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    if args.style == "mae" and args.order != "head":
        p.error(f"--order {args.order}: the mae style names its decoder queries by rank "
                "(order at the head); --order none|input need --style bert")
    if args.n_max < MIN_PARTICLES:
        p.error(f"--n-max {args.n_max}: MPM hides at least one particle and shows at least one, "
                f"so a jet needs {MIN_PARTICLES} (shorter jets are dropped and counted)")
    if args.features == "auto":  # the same rule as diffmae.py's
        args.features = "kin" if args.data == "toptagging" else "full"
    if args.features == "full" and args.data == "toptagging":
        p.error("--features full: Top Tagging files carry no particle ID or impact parameters "
                "(they would all read 0); use --features kin")
    names = [common.FEATURE_NAMES[args.features][c] for c in input_cols(args.features)]
    bad = [f"--drop-features: {n!r} is not one of the '{args.features}' inputs {names}"
           for n in args.drop_features.split(",") if n and n not in names]
    if bad:
        p.error("; ".join(bad))
    return args


# --- the method: features and targets -----------------------------------------------------------
# "full" columns (common.FEATURE_NAMES): 0-4 kinematics, 5 charge, 6-10 PID flags (charged and
# neutral hadron, photon, electron, muon), 11-14 IPs, 15-16 deta, dphi; "kin": 0-4, deta, dphi
PID_COLS = list(range(5, 11))
N_PID = 8
# targets: v2's 7 quantities (pT, the 4 impact parameters, deta, dphi); 3 with "kin"
TARGET_COLS = {"full": [0, 11, 12, 13, 14, 15, 16], "kin": [0, 5, 6]}
IP_TARGETS = [1, 2, 3, 4]  # the impact parameters' positions in TARGET_COLS
PAD = "batch"  # the encoder needs no fixed particle axis
CPU = torch.device("cpu")


def input_cols(features, drop=""):
    """Columns of the feature embedding: all but `drop` (comma-separated names); with "full"
    the charge and PID flags enter through the ID embedding instead."""
    names = common.FEATURE_NAMES[features]
    dropped = drop.split(",")
    return [c for c, n in enumerate(names)
            if n not in dropped and (features == "kin" or c not in PID_COLS)]


def pid_class(x):
    """(..., 17) "full" features -> (...,) int64 particle ID, type x charge as in MPM v2:
    0 photon, 1 neutral hadron, 2/3 charged hadron +/-, 4/5 electron +/-, 6/7 muon +/-."""
    neg = (x[..., 5] < 0).long()
    charged = x[..., 5] != 0
    return torch.where(x[..., 10] > 0.5, 6 + neg,
           torch.where(x[..., 9] > 0.5, 4 + neg,
           torch.where(charged, 2 + neg,
           torch.where(x[..., 8] > 0.5, 0, 1))))  # noqa: E128


def raw_targets(x, features):
    """(..., F) -> (..., D) the quantities to predict; neutral particles' impact parameters are
    undefined, so they are set to 0 here (a fixed value, never noise: labels stay meaningful)."""
    t = x[..., TARGET_COLS[features]].float()
    if features == "full":
        t[..., IP_TARGETS] = torch.where((x[..., 5] == 0)[..., None], 0.0, t[..., IP_TARGETS])
    return t


# --- the method: masking -------------------------------------------------------------------------
def make_mask(valid, frac, generator):
    """valid (B, N) bool -> mask (B, N) bool: floor(frac n) of each jet's n real particles, at
    least 1 and at most n - 1, chosen uniformly; padding is never masked. Drawn on the CPU."""
    n = valid.sum(1)                                                     # (B,)
    n_mask = torch.minimum((frac * n.double()).floor().long().clamp(min=1), n - 1)
    key = torch.rand(valid.shape, generator=generator).masked_fill(~valid, 2.0)
    return key.argsort(1).argsort(1) < n_mask[:, None]                   # rank of each key


def front(select):
    """select (B, N) bool -> indices (B, M) of the selected slots first, in their order (so in
    pT order), and their validity (B, M); M = most selected in a jet, rounded up to 16."""
    B, N = select.shape
    pos = torch.arange(N).expand(B, N)
    idx = (pos + N * (~select).long()).argsort(1)
    return common.trim_batch(pos < select.sum(1, keepdim=True), idx)


def visible_frame(x, p4, valid, mask):
    """x (B, N, F) with its axis-dependent columns recomputed from the axis of the visible
    particles (valid and not masked) alone: nothing of a masked particle enters a visible one's
    features. The masked particles are measured from the same axis (their targets)."""
    seen = (valid & ~mask)[..., None]
    axis = common.axis_of(torch.where(seen, p4.float(), 0.0).sum(1))    # (B, 4)
    return common.refeature(x, p4, valid, axis)


def masked_batch(batch, args, generator, device):
    """Stream batch (CPU) -> dict on `device`: the masked particles x_m (B, M, F) in pT order
    (position j = rank j) with valid_m; the encoder's input (mae: the visible particles x (B, N',
    F); bert: the whole jet with the masked slots zeroed, mask (B, N) and their slots mask_idx
    (B, M)) with valid. Jets of fewer than MIN_PARTICLES are dropped first; returns (dict, how
    many). On the CPU, outside forward."""
    short = batch["valid"].sum(1) < MIN_PARTICLES
    keep = {k: batch[k][~short] if short.any() else batch[k] for k in ("x", "p4", "valid")}
    x = keep["x"]
    valid = keep["valid"]
    mask = make_mask(valid, args.mask_frac, generator)
    if args.frame == "visible":
        x = visible_frame(x, keep["p4"], valid, mask)

    def rows(idx, ok):  # (B, M, F), zeroed where the sort put the other particles (padding)
        picked = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return picked.masked_fill(~ok[..., None], 0.0)
    valid_m, mask_idx = front(mask)
    out = dict(x_m=rows(mask_idx, valid_m), valid_m=valid_m)
    if args.style == "bert":
        out.update(x=x.masked_fill(mask[..., None], 0.0), valid=valid, mask=mask,
                   mask_idx=mask_idx)
    else:
        valid_v, vis_idx = front(valid & ~mask)
        out.update(x=rows(vis_idx, valid_v), valid=valid_v)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}, int(short.sum())


# --- the method: K-means ------------------------------------------------------------------------
def kmeans_assign(points, centroids):
    """Nearest centroid of each point (P, D) -> (P,) int64: argmin of |c|^2 - 2 p.c (|p|^2 is
    common to all centroids) in float64, immune to autocast and to TF32 (on in common.setup for
    fp32 matmuls on the GPU), and free of the cancellation that swaps close centroids in fp32."""
    c = centroids.double()
    c2 = (c * c).sum(1)                                                  # (K,)
    rows = max(1, (1 << 24) // len(c))  # distance blocks of 16M entries (128 MB)
    with torch.autocast(points.device.type, enabled=False):
        out = [torch.addmm(c2, p.double(), c.T, alpha=-2).argmin(1) for p in points.split(rows)]
    return torch.cat(out) if out else points.new_zeros(0, dtype=torch.long)


def fit_kmeans(points, k, steps, generator, batch_size=4096):
    """Mini-batch K-means (Sculley 2010) on points (P, D) from k distinct random points: each step
    moves every centroid to the running mean of all points assigned to it so far (rate 1/count)."""
    if len(points) < k:
        raise SystemExit(f"--k {k}: only {len(points)} training particles to fit K-means on; "
                         "lower --k or raise --kmeans-jets / --n-jets")
    pick = lambda idx: points[idx.to(points.device)]  # noqa: E731  (indices drawn on the CPU)
    centroids = pick(torch.randperm(len(points), generator=generator)[:k])
    counts = 0
    for _ in range(steps):
        batch = pick(torch.randint(len(points), (batch_size,), generator=generator))
        label = kmeans_assign(batch, centroids)
        n = torch.bincount(label, minlength=k).to(points.dtype)
        counts += n
        sums = torch.zeros_like(centroids).index_add_(0, label, batch)
        centroids += (sums - n[:, None] * centroids) / counts.clamp(min=1)[:, None]
    return centroids


@torch.no_grad()
def fit_targets(stream, args, device):
    """Target mean/std and K-means centroids from the real particles of the first --kmeans-jets
    jets of one shuffled epoch of `stream` (its own seed: units from random files), in the frame
    the targets use (--frame visible: each jet's visible axis under a training-like mask)."""
    t0 = time.time()
    parts = []
    n = 0
    gen = common.generator(args.seed, "kmeans-masks")
    for batch in common.loader(stream, CPU):
        take = min(len(batch["valid"]), args.kmeans_jets - n)
        x, p4, valid = (batch[k][:take] for k in ("x", "p4", "valid"))
        if args.frame == "visible":
            x = visible_frame(x, p4, valid, make_mask(valid, args.mask_frac, gen))
        parts.append(raw_targets(x[valid], args.features))
        n += take
        if n == args.kmeans_jets:
            break
    raw = torch.cat(parts).to(device)                                    # (P, D) real only
    mean = raw.mean(0)
    std = raw.std(0).clamp(min=1e-6)
    centroids = fit_kmeans((raw - mean) / std, args.k, args.kmeans_steps,
                           common.generator(args.seed, "kmeans-fit"))
    print(f"targets fitted on {len(raw)} particles of {n} jets in {time.time() - t0:.1f} s")
    return dict(mean=mean, std=std, centroids=centroids)


# --- the method: encoder, heads, loss -----------------------------------------------------------
class MPMEncoder(common.Encoder):
    """common.Encoder plus an ID embedding, register tokens and (--order input) a pT-rank
    embedding. forward(x (B, N, F), valid (B, N), mask (B, N) or None, mask_token (C,)) ->
    tokens (B, N, C) (zero at padding), valid (B, N), jet (B, C) (class attention)."""

    def __init__(self, cfg):
        super().__init__(common.EncoderConfig(
            in_dim=len(cfg["input_cols"]), dim=cfg["dim"], heads=cfg["heads"], depth=cfg["depth"],
            cls_depth=1, pair_dim=(), embed_hidden=(cfg["dim"],)))
        self.register_buffer("input_cols", torch.tensor(cfg["input_cols"]), persistent=False)
        self.pid_embed = nn.Embedding(N_PID, cfg["dim"]) if cfg["features"] == "full" else None
        self.registers = nn.Parameter(torch.randn(1, cfg["n_registers"], cfg["dim"]) * 0.02)
        n_rank = cfg.get("n_rank", 0)  # checkpoints from before --order have none
        self.rank = nn.Parameter(torch.randn(n_rank, cfg["dim"]) * 0.02) if n_rank else None

    def forward(self, x, valid, mask=None, mask_token=None):
        B, N = valid.shape
        R = self.registers.shape[1]
        x = torch.where(valid[..., None], x, 0.0)  # padding may hold anything
        h = self.embed(x[..., self.input_cols])                              # (B, N, C)
        if self.pid_embed is not None:
            h = h + self.pid_embed(pid_class(x))
        if mask is not None:  # bert: nothing of a masked particle, its ID included, enters
            h = torch.where(mask[..., None], mask_token.to(h.dtype), h)
        if self.rank is not None:  # slot j holds the jet's j-th hardest particle (pT-sorted)
            h = h + self.rank[torch.arange(N, device=h.device).clamp(max=len(self.rank) - 1)]
        h = torch.cat([self.registers.expand(B, -1, -1).to(h.dtype), h], 1)  # (B, R + N, C)
        bias = common.attention_bias(torch.cat([valid.new_ones(B, R), valid], 1), None, h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        h = h[:, R:]                                                         # (B, N, C)
        cls_bias = common.attention_bias(torch.cat([valid.new_ones(B, 1), valid], 1), None,
                                         h.dtype)
        cls = self.cls_token.expand(B, -1, -1)
        for block in self.cls_blocks:
            cls = block(cls, h, cls_bias)
        return self.norm(h) * valid[..., None], valid, self.norm(cls[:, 0])


def build_encoder(cfg):
    """The pretrained backbone from its config dict (a checkpoint's encoder_config)."""
    return MPMEncoder(dict(cfg))


def encoder_inputs(batch, cfg):  # the encoder's forward kwargs from a stream batch (on device)
    return dict(x=batch["x"], valid=batch["valid"])


def batch_transform(cfg):
    return None  # particles only: no per-batch work in the loader workers


class MPM(nn.Module):
    """Encoder + (mae) decoder or (bert) mask token and head + output heads; forward(b) -> loss,
    stats. Only the parameters a style uses exist, so each takes part in every step (DDP). The
    K-means centroids and target statistics are buffers: they travel with the weights, and DDP
    broadcasts rank 0's."""

    def __init__(self, args, enc_cfg, fit):
        super().__init__()
        self.style = args.style
        self.features = args.features
        self.smoothing = args.label_smoothing
        self.id_weight = args.id_weight if args.features == "full" else 0.0
        self.encoder = build_encoder(enc_cfg)
        for name, key in (("centroids", "centroids"), ("t_mean", "mean"), ("t_std", "std")):
            self.register_buffer(name, fit[key].float())
        C = enc_cfg["dim"]
        if self.style == "mae":
            D = args.dec_dim
            self.dec_in = nn.Linear(C, D)
            self.null = nn.Parameter(torch.randn(args.n_max, D) * 0.02)  # one per rank k
            self.dec_blocks = nn.ModuleList(common.Block(D, args.dec_heads)
                                            for _ in range(args.dec_depth))
            self.dec_norm = nn.LayerNorm(D)
        else:
            D = C
            self.mask_token = nn.Parameter(torch.randn(C) * 0.02)
            self.jet_in = nn.Linear(C, C)
            self.rank = (nn.Parameter(torch.randn(args.n_max, C) * 0.02)
                         if args.order == "head" else None)
            self.pred = nn.Sequential(nn.LayerNorm(C), common.Mlp(C, 2 * C), nn.LayerNorm(C))
        self.head = nn.Linear(D, args.k)
        self.id_head = nn.Linear(D, N_PID) if self.id_weight > 0 else None

    def decoder_input(self, tokens, valid, jet, valid_m):
        """Decoder sequence [jet, visible tokens, null tokens] (B, 1 + N + M, D) and its validity.
        The k-th null token is learned vector k: nothing about the masked particle but its rank."""
        B, M = valid_m.shape
        ctx = self.dec_in(torch.cat([jet[:, None], tokens], 1))
        queries = self.null[:M].expand(B, M, -1).to(ctx.dtype)
        return torch.cat([ctx, queries], 1), torch.cat([valid.new_ones(B, 1), valid, valid_m], 1)

    def predict(self, b):
        """-> (B, M, D), one row per masked particle, for the output heads."""
        M = b["valid_m"].shape[1]
        if self.style == "bert":  # the encoder's output at the masked slots, plus the jet vector
            tokens, _, jet = self.encoder(b["x"], b["valid"], b["mask"], self.mask_token)
            h = tokens.gather(1, b["mask_idx"][..., None].expand(-1, -1, tokens.shape[-1]))
            h = h + self.jet_in(jet)[:, None]                               # (B, M, C)
            if self.rank is not None:  # --order head: the k-th masked particle gets vector k
                h = h + self.rank[:M].to(h.dtype)
            return self.pred(h)
        h, v = self.decoder_input(*self.encoder(b["x"], b["valid"]), b["valid_m"])  # visible only
        bias = common.attention_bias(v, None, h.dtype)
        for block in self.dec_blocks:
            h = block(h, bias)
        return self.dec_norm(h[:, -M:])

    def forward(self, b):
        vm = b["valid_m"].float()                                           # (B, M)
        n = vm.sum().clamp(min=1)

        def masked_ce(logits, target):  # fp32, mean over the real masked particles
            ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none",
                                 label_smoothing=self.smoothing)
            return (ce * vm.flatten()).sum() / n
        h = self.predict(b)
        out = self.head(h)                                                  # (B, M, K)
        with torch.no_grad():  # the masked particles' standardised targets -> nearest centroid
            t = (raw_targets(b["x_m"], self.features) - self.t_mean) / self.t_std  # (B, M, D)
            label = kmeans_assign(t.flatten(0, 1), self.centroids).view(t.shape[:2])
        loss = masked_ce(out, label)
        stats = dict(token_loss=loss.detach(),
                     token_acc=((out.argmax(-1) == label).float() * vm).sum() / n)
        if self.id_head is not None:
            stats["id_loss"] = masked_ce(self.id_head(h), pid_class(b["x_m"]))
            loss = loss + self.id_weight * stats["id_loss"]
        return loss, stats


@torch.no_grad()
def evaluate(raw_model, stream, args, s):
    """Val loss and masked-token accuracy; the same masks at every evaluation (own generator)."""
    raw_model.eval()
    gen = common.generator(args.seed, "eval-masks")
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in common.loader(stream, CPU):
        b, _ = masked_batch(batch, args, gen, s.device)
        with s.ctx:
            loss, stats = raw_model(b)
        n = b["valid_m"].sum()
        sums += torch.stack([loss * n, stats["token_acc"] * n, n]).double().cpu()
    raw_model.train()
    return dict(loss=common.check_val_loss(sums[0] / sums[2], f"{args.data} val"),
                token_acc=float(sums[1] / sums[2]))


# --- training -----------------------------------------------------------------------------------
def train(args, data=None):
    """Pretrain; returns the final metrics. data: {"train": ..., "val": ...}, what to stream
    instead of the --data files (common.Jets in memory: tests, notebooks)."""
    s = common.setup(args)
    common.claim_output(Path(args.out) / "mpm.pt", args)
    print(f"mpm: {vars(args)}\ngit {common.git_hash()} {common.versions()} device {s.device}")

    def stream(split, **kw):  # every split streams: bounded memory whatever its size
        return common.JetStream(data[split] if data else args.data, split, path=args.data_dir,
                                n_max=args.n_max, features=args.features, pad=PAD,
                                batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                                workers=args.workers, **kw)
    train_stream = stream("train", n_jets=args.n_jets, seed=args.seed, rank=s.rank,
                          world_size=s.world_size)
    val_stream = stream("val", n_jets=args.n_eval, shuffle=False, drop_last=False)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    eval_every = args.eval_every or len(train_stream)
    # --- targets: rank 0 fits them (DDP broadcasts its buffers); a resumed run reads them back
    D = len(TARGET_COLS[args.features])
    fit = dict(mean=torch.zeros(D), std=torch.ones(D), centroids=torch.zeros(args.k, D))
    if s.master and not args.resume:
        fit = fit_targets(stream("train", n_jets=args.n_jets, drop_last=False,
                                 seed=common.seed_of(args.seed, "kmeans")), args, s.device)
    # --- model, optimizer, resume
    enc_cfg = dict(features=args.features, dim=args.dim, heads=args.heads, depth=args.depth,
                   input_cols=input_cols(args.features, args.drop_features),
                   n_registers=args.n_registers,
                   n_rank=args.n_max if args.order == "input" else 0)  # ranks 0..n_max-1
    torch.manual_seed(args.seed)
    raw_model = MPM(args, enc_cfg, fit).to(s.device)
    print(f"{sum(p.numel() for p in raw_model.parameters()):,} parameters, of which the encoder "
          f"{sum(p.numel() for p in raw_model.encoder.parameters()):,}")
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start_step = (common.resume_from(args.resume, raw_model, optimizer, args=args,
                                     data=train_stream.identity)
                  if args.resume else 0)
    model = common.wrap_model(raw_model, s)
    log = None
    if s.master:
        log = common.JsonlLogger(Path(args.out) / "mpm.jsonl",
                                 resume_step=start_step if args.resume else None)
    # --- training loop: 1. batch + masks (CPU)  2. forward  3. backward + step
    bar = common.progress_bar(total, args.batch_size * s.world_size, start_step, s.master)
    record = None
    short = 0  # jets dropped for having fewer than MIN_PARTICLES (this rank, this run)
    t0 = time.time()
    batches = common.train_batches(train_stream, CPU, args.epochs, steps=args.steps,
                                   start_step=start_step)
    for step, epoch, batch in batches:
        # 1. masks from (seed, rank, step) alone: ranks differ, and resume needs no mask state
        b, n_short = masked_batch(batch, args, common.generator(args.seed, "masks", s.rank, step),
                                  s.device)
        short += n_short
        lr = common.lr_at(step, total, warmup, args.lr)
        common.set_lr(optimizer, lr)
        # 2. forward
        with s.ctx:
            loss, stats = model(b)
        # 3. backward + step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        dt = time.time() - t0
        t0 = time.time()
        bar.update(args.batch_size * s.world_size)
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            common.check_finite(loss, step + 1, train_stream.describe(batch["source"][0]))
            bar.set_postfix(loss=f"{loss.item():.4f}")  # the one host sync, every --log-every
            if s.master:
                bar.write(f"step {step + 1}/{total}: loss {loss.item():.4f}, lr {lr:.2e}, "
                          f"dt {1000 * dt:.0f} ms")
        if s.master and ((step + 1) % eval_every == 0 or step + 1 == total):
            record = dict(step=step + 1, epoch=epoch, loss=loss.item(), short_jets=short,
                          val=evaluate(raw_model, val_stream, args, s))
            log.log(record)
            bar.write(f"step {step + 1}: val loss {record['val']['loss']:.4f}, masked-token "
                      f"accuracy {record['val']['token_acc']:.4f}"
                      + (f"; {short} jets with < {MIN_PARTICLES} particles dropped" if short
                         else ""))
            common.check_finite(loss, step + 1, f"{args.data} train")
            common.save_checkpoint(Path(args.out) / "mpm.pt", method="mpm", args=args,
                                   model=raw_model, encoder=raw_model.encoder,
                                   encoder_config=enc_cfg, optimizer=optimizer, step=step + 1,
                                   data=train_stream.identity)
            t0 = time.time()  # the next dt is a training step's, not the evaluation's
    bar.close()
    # --- end of run: the linear probe (fit: bounded train sample, score: val)
    result = dict(steps=total, loss=record and record["loss"], val=record and record["val"],
                  short_jets=short)
    if s.master and common.probe_possible(train_stream):
        fit_stream = stream("train", n_jets=args.n_eval or 20_000, shuffle=False, drop_last=False)
        def embed(st):
            return common.embed_stream(raw_model.encoder, st, s.device, s.ctx, ("x", "valid"))
        z_fit, y_fit = embed(fit_stream)
        z_val, y_val = embed(val_stream)
        p = result["probe"] = common.linear_probe(z_fit, y_fit, z_val, y_val)
        print(f"linear probe (common.linear_probe, fitted on {len(y_fit)} train jets, scored on "
              f"{len(y_val)} val jets): acc {p['acc']:.4f}, auc {p['auc']:.4f}")
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
