"""Masked particle modelling (MPM): pretrain a jet encoder by hiding some particles and
predicting them from the rest.

Idea (MPM v1, Golling et al., arXiv 2401.13537; v2, Leigh et al., arXiv 2409.12589): a jet is a
set of particles, so BERT's recipe needs two changes. (1) A continuous particle has no word to
predict: turn each one into a token by K-means clustering of its features (or regress the
features directly). (2) Identical mask tokens in a set cannot be told apart: the k-th masked
particle in pT order is identified by its rank k, given only where the prediction is made.
v1 (`--style bert`) puts one learnable mask token at each masked particle's slot in the
encoder's input and adds the rank at the prediction head. v2 (`--style mae`, default) removes
the masked particles from the encoder altogether; a small decoder reads the encoder's outputs
plus one learnable "null" token per masked particle, the k-th getting learned vector k, and
predicts the masked particles from those. v2 adds a particle-ID task (type x charge, 8 classes)
with weight 0.3, feeds the visible particles' ID as an embedding, and uses register tokens.

How this file does it: masks are drawn on the CPU with their own seeded torch.Generator, for a
whole batch at once (a random key per particle, padding keyed last, the lowest floor(f n)
keys masked), then moved to the device; the encoder only ever sees compact index tensors
(gather), never a boolean selection. K-means is fitted once in torch (mini-batch, Sculley
2010) on a sample of training particles, cached next to the data cache and stored in the
checkpoint; labels are assigned on the fly in fp32. The encoder is common's ParT-lite block
stack with an ID embedding, registers, an optional pair bias (visible particles only) and a
jet vector from class attention or the mean over particles. At the end a linear probe is fitted
on frozen jet vectors, next to the same probe on the encoder's weights before pretraining.

Deviations from the papers / public code (mattcleigh/jetssl), and why:
- Features: ParT's 17-feature "full" recipe (7 "kin" on Top Tagging files, which carry no ID
  or impact parameters) instead of quantile-transformed (pT, deta, dphi, d0, d0err, dz, dzerr).
  K-means and regression targets are v2's 7 quantities (3 with "kin": pt_log, deta, dphi),
  standardised; neutral particles' impact parameters are set to 0 in the targets so that their
  labels depend on their kinematics only (v2's code put fresh noise there: random labels).
- Blocks: common's pre-norm GELU blocks (no SwiGLU, no LayerScale); no VQ-VAE or flow head.
- Jet vector: the class-attention pooling (or the mean) is also a context token of the decoder
  (mae) / an input of the prediction head (bert), so the pooling is trained by pretraining and
  the probe reads a trained summary rather than a random one.
- The probe is fitted after training on detached vectors (full-batch L-BFGS logistic
  regression) instead of online: v2's online probe once leaked gradient into the backbone.
- Default size: K = 512 (v1) instead of 16,384; AdamW with warm-up and cosine (common's).

GPU:  python mpm.py --data pythia --data-dir data/pythia10 --preset v2 --k 16384 --epochs 50
CPU:  OMP_NUM_THREADS=1 python mpm.py --data-dir data/pythia10 --n-jets 2000 --epochs 2 --k 64
"""
import argparse
import copy
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config -------------------------------------------------------------------------------------

PRESETS = {
    # minutes on a laptop CPU
    "small": dict(dim=64, depth=3, heads=4, n_registers=2, dec_dim=64, dec_depth=2, dec_heads=4),
    # near MPM v2 (encoder 512 x 8 layers x 8 heads, 8 registers; decoder 128 x 4 layers)
    "v2": dict(dim=512, depth=8, heads=8, n_registers=8, dec_dim=128, dec_depth=4, dec_heads=4),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=1e-3, weight_decay=1e-5, batch_size=256, n_eval=10000)
    g = p.add_argument_group("masking and targets")
    g.add_argument("--style", choices=["mae", "bert"], default="mae",
                   help="mae (v2): masked particles removed from the encoder, decoded from rank-"
                        "indexed null tokens; bert (v1): a mask token at their input slots, rank "
                        "given at the prediction head only")
    g.add_argument("--mask-frac", type=float, default=0.4,
                   help="fraction of each jet's real particles masked (floor(f n), at least one, "
                        "at most n - 1)")
    g.add_argument("--target", choices=["kmeans", "regress"], default="kmeans",
                   help="kmeans: cross-entropy on the nearest centroid; regress: L1 on the "
                        "standardised features")
    g.add_argument("--k", type=int, default=512, help="K-means centroids (v1 512, v2 16384)")
    g.add_argument("--kmeans-particles", type=int, default=200_000,
                   help="training particles sampled to fit K-means")
    g.add_argument("--kmeans-steps", type=int, default=300, help="mini-batch K-means steps")
    g.add_argument("--kmeans-batch", type=int, default=4096, help="points per K-means step")
    g.add_argument("--label-smoothing", type=float, default=0.1,
                   help="label smoothing of the token and ID cross-entropies (v2: 0.1)")
    g.add_argument("--id-weight", type=float, default=0.3,
                   help="weight of the particle-ID task (type x charge, 8 classes); used when "
                        "the features carry PID flags ('full'); 0 switches it off")
    g.add_argument("--features", choices=["auto", "full", "kin"], default="auto",
                   help="auto: 'full' (with PID and impact parameters) except on toptagging")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS), default="small",
                   help="sizes below default to the preset's; an explicit flag wins")
    for name, kind in [("dim", "encoder width"), ("depth", "encoder blocks"),
                       ("heads", "encoder heads"), ("n-registers", "register tokens"),
                       ("dec-dim", "decoder width (mae)"), ("dec-depth", "decoder blocks (mae)"),
                       ("dec-heads", "decoder heads (mae)")]:
        g.add_argument(f"--{name}", type=int, default=None, help=f"{kind} (default: preset)")
    g.add_argument("--pair-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="ParT pair-feature attention bias among the visible particles")
    g.add_argument("--jet-repr", choices=["cls", "mean"], default="cls",
                   help="jet vector: class-attention pooling or the mean over particle tokens")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the encoder blocks")
    g = p.add_argument_group("linear probe (end of run)")
    g.add_argument("--probe-jets", type=int, default=10000,
                   help="training jets the probe is fitted on (scored on --n-eval val jets)")
    g.add_argument("--probe-steps", type=int, default=200, help="L-BFGS iterations of the probe")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0.0 < args.mask_frac < 1.0:
        p.error(f"--mask-frac {args.mask_frac}: must lie strictly between 0 and 1")
    if args.features == "auto":
        args.features = "kin" if args.data == "toptagging" else "full"
    return args


# --- the method: feature columns -----------------------------------------------------------------
# "full" columns (common.FEATURE_NAMES): 0-4 kinematics, 5 charge, 6-10 PID flags (charged
# hadron, neutral hadron, photon, electron, muon), 11-14 tanh d0, d0err, tanh dz, dzerr, 15-16
# deta, dphi. "kin": 0-4 kinematics, 5-6 deta, dphi.
PID_COLS = list(range(5, 11))
N_PID = 8
# targets: v2's 7 quantities (pT, the 4 impact parameters, deta, dphi); 3 with "kin"
TARGET_COLS = {"full": [0, 11, 12, 13, 14, 15, 16], "kin": [0, 5, 6]}
IP_TARGETS = [1, 2, 3, 4]                                              # IP positions in TARGET_COLS


def input_cols(features):
    """Columns fed to the feature embedding; with "full" the ID has its own embedding."""
    n = len(common.FEATURE_NAMES[features])
    return [c for c in range(n) if features == "kin" or c not in PID_COLS]


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
        neutral = (x[..., 5] == 0)[..., None]
        t[..., IP_TARGETS] = torch.where(neutral, 0.0, t[..., IP_TARGETS])
    return t


# --- the method: masking -------------------------------------------------------------------------

def make_mask(valid, frac, generator):
    """valid (B, N) bool -> mask (B, N) bool: floor(frac n) of each jet's n real particles, at
    least 1 and at most n - 1, chosen uniformly; padding is never masked. Drawn on the CPU."""
    n = valid.sum(1)                                                     # (B,)
    n_mask = torch.minimum((frac * n.double()).floor().long().clamp(min=1), n - 1)
    key = torch.rand(valid.shape, generator=generator).masked_fill(~valid, 2.0)
    order = key.argsort(1).argsort(1)                                    # (B, N) rank of each key
    return order < n_mask[:, None]


def gather_rows(t, idx):
    """t (B, N, ...) gathered along N with idx (B, M) -> (B, M, ...)."""
    idx = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, idx)


def split_batch(batch, mask, style):
    """Index the masked particles (B, M) in pT order (they keep their order in the valid-first,
    pT-sorted jet, so position j of the list is the rank among the masked ones) and, for mae,
    move the visible particles to the front. Runs on the CPU, outside forward."""
    x, valid, p4 = batch["x"], batch["valid"], batch["p4"]
    B, N = valid.shape
    pos = torch.arange(N).expand(B, N)
    mask_idx = (pos + N * (~mask).long()).argsort(1)                     # masked first, in order
    valid_m = pos < mask.sum(1, keepdim=True)
    valid_m, mask_idx = common.trim_batch(valid_m, mask_idx)             # (B, M)
    out = dict(x_m=gather_rows(x, mask_idx), valid_m=valid_m)
    if style == "bert":
        out.update(x=x, valid=valid, p4=p4, mask=mask, mask_idx=mask_idx)
    else:
        visible = valid & ~mask
        vis_idx = (pos + N * (~visible).long()).argsort(1)               # visible first, in order
        valid_v = pos < visible.sum(1, keepdim=True)
        valid_v, vis_idx = common.trim_batch(valid_v, vis_idx)
        out.update(x=gather_rows(x, vis_idx), valid=valid_v, p4=gather_rows(p4, vis_idx))
    return out


# --- the method: K-means ------------------------------------------------------------------------

def kmeans_assign(points, centroids, chunk=65536):
    """Nearest centroid of each point (P, D) -> (P,) int64, in fp32 or better even under autocast
    (bf16 distances would reorder close centroids)."""
    c = centroids if centroids.dtype == torch.float64 else centroids.float()
    c2 = (c * c).sum(1)                                                  # (K,)
    out = []
    with torch.autocast(points.device.type, enabled=False):
        for start in range(0, len(points), chunk):
            p = points[start:start + chunk].to(c.dtype)
            out.append((c2 - 2 * p @ c.T).argmin(1))  # |p|^2 is the same for every centroid
    return torch.cat(out) if out else points.new_zeros(0, dtype=torch.long)


def fit_kmeans(points, k, steps, batch_size, generator):
    """Mini-batch K-means (Sculley 2010) on points (P, D): start from k distinct random points;
    each step assigns a random batch and moves every centroid to the running mean of all the
    points it has been assigned so far (per-centroid rate 1 / count)."""
    if len(points) < k:
        raise SystemExit(f"--k {k}: only {len(points)} training particles to fit K-means on; "
                         "lower --k or raise --n-jets / --kmeans-particles")
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    counts = torch.zeros(k, dtype=points.dtype)
    for _ in range(steps):
        batch = points[torch.randint(len(points), (batch_size,), generator=generator)]
        label = kmeans_assign(batch, centroids)
        n = torch.bincount(label, minlength=k).to(points.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, label, batch)
        counts += n
        centroids += (sums - n[:, None] * centroids) / counts.clamp(min=1)[:, None]
    return centroids


def kmeans_sample(jets, features, n_particles, generator):
    """Up to n_particles real (never padding) particles from random training jets (the jets are
    stored class by class, so the first ones would all be of one class) -> raw targets."""
    n_jets = min(len(jets), max(1, n_particles // 8))  # ~8+ real particles per jet is plenty
    rows = torch.randperm(len(jets), generator=generator)[:n_jets].sort().values.numpy()
    valid = torch.from_numpy(np.asarray(jets.valid[rows]))  # fancy indexing copies: writable
    x = torch.from_numpy(np.asarray(jets.x[rows]))[valid]                # (P, F) real only
    pick = torch.randperm(len(x), generator=generator)[:n_particles].sort().values
    return raw_targets(x[pick], features)


def kmeans_fit_cached(jets, args):
    """Centroids and target standardisation, fitted once and cached in the data cache folder
    under a digest of the sampled particles and the settings (so a change of either refits)."""
    gen = torch.Generator().manual_seed(args.seed)
    raw = kmeans_sample(jets, args.features, args.kmeans_particles, gen)
    mean, std = raw.mean(0), raw.std(0).clamp(min=1e-6)
    points = (raw - mean) / std
    if args.target != "kmeans":
        return dict(centroids=torch.zeros(0, len(mean)), mean=mean, std=std, seconds=0.0)
    digest = hashlib.sha1(points.numpy().tobytes())
    digest.update(repr((args.k, args.kmeans_steps, args.kmeans_batch, args.seed)).encode())
    path = common.cache_root() / f"mpm_kmeans_{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        print(f"K-means: {args.k} centroids from the cache {path}")
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    centroids = fit_kmeans(points, args.k, args.kmeans_steps, args.kmeans_batch, gen)
    seconds = time.perf_counter() - t0
    used = torch.bincount(kmeans_assign(points, centroids), minlength=args.k).gt(0).sum()
    print(f"K-means: {args.k} centroids on {len(points)} particles in {seconds:.1f} s "
          f"({int(used)} of them in use)")
    fit = dict(centroids=centroids, mean=mean, std=std, seconds=seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(fit, tmp)
    os.replace(tmp, path)  # atomic: another run never reads a half-written file
    return fit


# --- the method: encoder, decoder, loss -------------------------------------------------------

class MPMEncoder(common.Encoder):
    """common.Encoder plus what MPM needs: a particle-ID embedding, register tokens, a mask token
    (bert) and mean pooling as an alternative to class attention.
    forward(x (B, N, F), valid (B, N), p4 (B, N, 4) or None, mask (B, N) or None) ->
    tokens (B, N, C) (zero at padding), valid (B, N), jet (B, C)."""

    def __init__(self, cfg):
        enc = {k: cfg[k] for k in ("dim", "heads", "depth", "pair_dim", "mlp_ratio", "dropout")}
        super().__init__(common.EncoderConfig(in_dim=len(cfg["input_cols"]), cls_depth=1,
                                              embed_hidden=(cfg["dim"],), **enc))
        self.mpm_cfg = cfg
        self.register_buffer("input_cols", torch.tensor(cfg["input_cols"]), persistent=False)
        self.pid_embed = nn.Embedding(N_PID, cfg["dim"]) if cfg["features"] == "full" else None
        # bert only (a parameter without gradient upsets DDP); drawn either way, so both styles
        # start from the same weights
        mask_token = torch.randn(cfg["dim"]) * 0.02
        self.mask_token = nn.Parameter(mask_token) if cfg.get("mask_token", True) else None
        self.registers = nn.Parameter(torch.randn(1, cfg["n_registers"], cfg["dim"]) * 0.02)
        if cfg["jet_repr"] == "mean":  # no class-attention weights that nothing trains
            del self.cls_blocks, self.cls_token

    def forward(self, x, valid, p4=None, mask=None):
        B, N, _ = x.shape
        R = self.registers.shape[1]
        x = torch.where(valid[..., None], x, 0.0)  # padding may hold anything
        h = self.embed(x[..., self.input_cols])                              # (B, N, C)
        if self.pid_embed is not None:
            h = h + self.pid_embed(pid_class(x))
        seen = valid
        if mask is not None:  # bert: nothing of a masked particle (features, ID, pairs) enters
            h = torch.where(mask[..., None], self.mask_token.to(h.dtype), h)
            seen = valid & ~mask
        pair = None
        if self.cfg.pair_dim:
            if p4 is None:
                raise ValueError("MPMEncoder: pair_dim is set (--pair-bias), so forward needs p4")
            pair = self.pair_bias(torch.where(seen[..., None], p4, 0.0), seen)  # (B, N, N, H)
            pair = F.pad(pair, (0, 0, R, 0, R, 0))                           # registers: 0
        h = torch.cat([self.registers.expand(B, -1, -1).to(h.dtype), h], 1)  # (B, R + N, C)
        valid_r = torch.cat([valid.new_ones(B, R), valid], 1)
        bias = common.attention_bias(valid_r, pair, h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        h = h[:, R:]                                                         # (B, N, C)
        tokens = self.norm(h) * valid[..., None]
        if self.mpm_cfg["jet_repr"] == "mean":
            jet = tokens.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        else:
            cls_bias = common.attention_bias(torch.cat([valid.new_ones(B, 1), valid], 1), None,
                                             h.dtype)
            cls = self.cls_token.expand(B, -1, -1)
            for block in self.cls_blocks:
                cls = block(cls, h, cls_bias)
            jet = self.norm(cls[:, 0])
        return tokens, valid, jet


def build_encoder(cfg):
    """The pretrained backbone from its config dict (finetune.py calls this)."""
    return MPMEncoder(dict(cfg))


class MPM(nn.Module):
    """Encoder + (mae) decoder or (bert) rank-aware head + output heads; forward returns the
    loss and its parts. The K-means centroids and target statistics are buffers, so they
    travel with the weights."""

    def __init__(self, args, enc_cfg, fit):
        super().__init__()
        self.style, self.target, self.features = args.style, args.target, args.features
        self.smoothing = args.label_smoothing
        self.id_weight = args.id_weight if args.features == "full" else 0.0
        self.encoder = build_encoder(enc_cfg)
        C = enc_cfg["dim"]
        self.register_buffer("centroids", fit["centroids"].float())
        self.register_buffer("t_mean", fit["mean"].float())
        self.register_buffer("t_std", fit["std"].float())
        n_rank = args.n_max  # one learned vector per possible rank among the masked particles
        if self.style == "mae":
            D = args.dec_dim
            self.dec_in = nn.Linear(C, D)
            self.null = nn.Parameter(torch.randn(n_rank, D) * 0.02)
            self.dec_blocks = nn.ModuleList(common.Block(D, args.dec_heads)
                                            for _ in range(args.dec_depth))
            self.dec_norm = nn.LayerNorm(D)
        else:
            D = C
            self.rank = nn.Parameter(torch.randn(n_rank, C) * 0.02)
            self.jet_in = nn.Linear(C, C)
            self.pred = nn.Sequential(nn.LayerNorm(C), common.Mlp(C, 2 * C), nn.LayerNorm(C))
        n_out = args.k if self.target == "kmeans" else len(TARGET_COLS[self.features])
        self.head = nn.Linear(D, n_out)
        self.id_head = nn.Linear(D, N_PID) if self.id_weight > 0 else None

    def decoder_input(self, tokens, valid, jet, valid_m):
        """Decoder sequence [jet, visible tokens, null tokens] (B, 1 + N + M, D) and its validity.
        The k-th null token is learned vector k: nothing about the masked particle but its rank."""
        B, M = valid_m.shape
        ctx = self.dec_in(torch.cat([jet[:, None], tokens], 1))
        queries = self.null[:M].expand(B, M, -1).to(ctx.dtype)
        return (torch.cat([ctx, queries], 1),
                torch.cat([valid.new_ones(B, 1), valid, valid_m], 1))

    def predict(self, b):
        """-> features of the masked particles (B, M, D) to feed the output heads."""
        if self.style == "mae":
            tokens, valid, jet = self.encoder(b["x"], b["valid"], b["p4"])  # visible only
            h, v = self.decoder_input(tokens, valid, jet, b["valid_m"])
            bias = common.attention_bias(v, None, h.dtype)
            for block in self.dec_blocks:
                h = block(h, bias)
            return self.dec_norm(h[:, -b["valid_m"].shape[1]:])
        tokens, _, jet = self.encoder(b["x"], b["valid"], b["p4"], mask=b["mask"])
        M = b["mask_idx"].shape[1]
        h = gather_rows(tokens, b["mask_idx"]) + self.rank[:M] + self.jet_in(jet)[:, None]
        return self.pred(h)  # the rank enters here, after the backbone (v1's best choice)

    def targets(self, x_m):
        """Standardised targets of the masked particles, and K-means labels; fp32, no grad."""
        t = (raw_targets(x_m, self.features) - self.t_mean) / self.t_std
        label = None
        if self.target == "kmeans":
            label = kmeans_assign(t.flatten(0, 1), self.centroids).view(t.shape[:2])
        return t, label

    def forward(self, b):
        vm = b["valid_m"].float()
        n = vm.sum().clamp(min=1)
        h = self.predict(b)
        out = self.head(h).float()
        with torch.no_grad():
            t, label = self.targets(b["x_m"])
        stats = {}
        if self.target == "kmeans":
            ce = F.cross_entropy(out.flatten(0, 1), label.flatten(), reduction="none",
                                 label_smoothing=self.smoothing)
            loss = (ce * vm.flatten()).sum() / n
            stats["token_acc"] = ((out.argmax(-1) == label).float() * vm).sum() / n
        else:
            err = (out - t).abs() * vm[..., None]                           # (B, M, D)
            loss = err.sum() / (n * t.shape[-1])
            stats["l1_per_feature"] = err.sum((0, 1)) / n
        stats["target_loss"] = loss.detach()
        if self.id_head is not None:
            pid = pid_class(b["x_m"])
            ce = F.cross_entropy(self.id_head(h).float().flatten(0, 1), pid.flatten(),
                                 reduction="none", label_smoothing=self.smoothing)
            id_loss = (ce * vm.flatten()).sum() / n
            loss = loss + self.id_weight * id_loss
            stats["id_loss"] = id_loss.detach()
        return loss, stats


# --- evaluation -----------------------------------------------------------------------------------

def masked_batches(data, args, device, generator, **kw):
    """Batches of `data` on the CPU -> masked and split there -> moved to `device`."""
    for batch in common.epoch_batches(data, args.batch_size, torch.device("cpu"), **kw):
        mask = make_mask(batch["valid"], args.mask_frac, generator)
        yield {k: v.to(device, non_blocking=True)
               for k, v in split_batch(batch, mask, args.style).items()}


@torch.no_grad()
def evaluate(raw_model, data, args, s):
    """Pretext loss and masked-token accuracy (kmeans) or L1 per target feature (regress) on
    the validation jets, with the same masks at every evaluation (own fixed-seed generator)."""
    raw_model.eval()
    gen = torch.Generator().manual_seed(args.seed + 12345)
    sums, n = {}, 0
    for b in masked_batches(data, args, s.device, gen, shuffle=False, drop_last=False):
        with s.ctx:
            loss, stats = raw_model(b)
        w = float(b["valid_m"].sum())
        for k, v in dict(loss=loss, **stats).items():
            sums[k] = sums.get(k, 0.0) + v.detach().double().cpu() * w
        n += w
    raw_model.train()
    return {k: (v / max(n, 1)).tolist() for k, v in sums.items()}


# --- training -----------------------------------------------------------------------------------

def train(args):
    s = common.setup(args)
    print(f"mpm: {vars(args)}\ngit {common.git_hash()} {common.versions()} device {s.device}")
    # --- data: a jet needs one particle to see and one to predict
    load = dict(path=args.data_dir, n_max=args.n_max, features=args.features)
    jets = common.load_jets(args.data, split="train", n_jets=args.n_jets, **load)
    keep = np.asarray(jets.valid).sum(1) >= 2
    if not keep.all():
        print(f"dropping {int((~keep).sum())} training jets with fewer than 2 particles")
        jets = jets[np.flatnonzero(keep)]
    val = common.load_jets(args.data, split="val", n_jets=args.n_eval, **load)
    val = val[np.flatnonzero(np.asarray(val.valid).sum(1) >= 2)]
    train_data = dict(x=jets.x, valid=jets.valid, p4=jets.p4)
    val_data = dict(x=val.x, valid=val.valid, p4=val.p4)
    # --- targets and model
    if args.id_weight > 0 and args.features != "full":
        print(f"--id-weight {args.id_weight}: no particle-ID task, '{args.features}' features "
              "carry no PID flags")
    fit = kmeans_fit_cached(jets, args)
    enc_cfg = dict(features=args.features, input_cols=input_cols(args.features), dim=args.dim,
                   heads=args.heads, depth=args.depth, pair_dim=[32, 32] if args.pair_bias else [],
                   mlp_ratio=4, dropout=args.dropout, n_registers=args.n_registers,
                   jet_repr=args.jet_repr, mask_token=args.style == "bert")
    torch.manual_seed(args.seed)
    raw_model = MPM(args, enc_cfg, fit).to(s.device)
    init_encoder = copy.deepcopy(raw_model.encoder.state_dict())  # the probe's floor
    n_params = sum(p.numel() for p in raw_model.encoder.parameters())
    n_all = sum(p.numel() for p in raw_model.parameters())
    print(f"encoder {n_params:,} parameters; with decoder and heads {n_all:,}")
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    mask_gen = torch.Generator().manual_seed(1_000_003 * (s.rank + 1) + args.seed)
    start_step = 0
    if args.resume:
        start_step = common.resume_from(args.resume, raw_model, optimizer, dict(mask=mask_gen))
    model = common.wrap_model(raw_model, s)
    steps_per_epoch = common.steps_per_epoch(len(jets), args.batch_size, s.world_size)
    total_steps = steps_per_epoch * args.epochs
    eval_every = args.eval_every or steps_per_epoch
    log = common.JsonlLogger(Path(args.out) / "mpm.jsonl") if s.master else None
    # --- flat training loop; masks drawn on the CPU from mask_gen, then moved to the device
    step, loss, history = start_step, None, []
    timed_from, t0, cpu0, t_prep, t_eval = start_step + 5, None, 0.0, 0.0, 0.0  # 5 warm-up steps
    tick = time.perf_counter()
    for step, epoch, batch in common.train_batches(train_data, args.batch_size,
                                                   torch.device("cpu"), args.epochs,
                                                   seed=args.seed, start_step=start_step,
                                                   rank=s.rank, world_size=s.world_size):
        mask = make_mask(batch["valid"], args.mask_frac, mask_gen)
        b = {k: v.to(s.device, non_blocking=True)
             for k, v in split_batch(batch, mask, args.style).items()}
        if step == timed_from:
            t0, cpu0, t_prep, t_eval = time.perf_counter(), time.process_time(), 0.0, 0.0
        t_prep += time.perf_counter() - tick  # data loading + masking, host side
        common.set_lr(optimizer, common.lr_at(step, total_steps, args.warmup, args.lr))
        with s.ctx:
            loss, stats = model(b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        loss = loss.detach()
        if s.master and ((step + 1) % eval_every == 0 or step + 1 == total_steps):
            t_ev, cpu_ev = time.perf_counter(), time.process_time()
            record = dict(step=step + 1, epoch=epoch, loss=float(loss),
                          val=evaluate(raw_model, val_data, args, s))
            history.append(record)
            log.log(record)
            print(f"step {step + 1}/{total_steps} loss {float(loss):.4f} "
                  f"val {record['val']['loss']:.4f}")
            common.save_checkpoint(Path(args.out) / "mpm.pt", method="mpm", args=args,
                                   model=raw_model, encoder=raw_model.encoder,
                                   encoder_config=enc_cfg, optimizer=optimizer, step=step + 1,
                                   generators=dict(mask=mask_gen), kmeans=fit)
            t_eval += time.perf_counter() - t_ev
            cpu0 += time.process_time() - cpu_ev
        tick = time.perf_counter()
    if s.device_type == "cuda":
        torch.cuda.synchronize()
    throughput = {}
    if t0 is not None:
        seconds = time.perf_counter() - t0 - t_eval
        n_jets = (step + 1 - timed_from) * args.batch_size * s.world_size
        throughput = dict(jets_per_s=n_jets / seconds, prep_fraction=t_prep / seconds,
                          jets_per_cpu_s=n_jets / (time.process_time() - cpu0))
        print(f"throughput {throughput['jets_per_s']:.0f} jets/s end to end, "
              f"{throughput['jets_per_cpu_s']:.0f} jets per CPU-second (data + masking "
              f"{100 * throughput['prep_fraction']:.0f}% of it, host side; without evaluation)")
    # --- end of run: masked-token metrics and the linear probe vs the same encoder at init
    result = dict(loss=float(loss) if loss is not None else float("nan"),
                  val=history[-1]["val"] if history else evaluate(raw_model, val_data, args, s),
                  kmeans_seconds=fit["seconds"], steps=step + 1, **throughput)
    if s.master and args.probe_jets > 0:
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(jets))[:args.probe_jets])
        probe_train = jets[pick]
        y_tr, y_te = np.asarray(probe_train.y), np.asarray(val.y)
        random_encoder = build_encoder(enc_cfg).to(s.device)
        random_encoder.load_state_dict(init_encoder)
        for name, enc in (("probe", raw_model.encoder), ("probe_random", random_encoder)):
            z_tr = common.embed(enc, dict(x=probe_train.x, valid=probe_train.valid, p4=probe_train.p4),
                                s.device, s.ctx, args.batch_size)
            z_te = common.embed(enc, val_data, s.device, s.ctx, args.batch_size)
            result[name] = common.linear_probe(z_tr, y_tr, z_te, y_te, args.probe_steps)
            result[name].pop("per_class", None)
        fmt = lambda m: " ".join(f"{k} {v:.4f}" for k, v in m.items())  # noqa: E731
        print(f"linear probe on {len(val)} val jets ({len(np.unique(y_tr))} classes, fitted on "
              f"{len(pick)} train jets):\n  pretrained : {fmt(result['probe'])}\n"
              f"  random init: {fmt(result['probe_random'])}")
    if s.master and "token_acc" in result["val"]:
        print(f"masked-token accuracy (val) {result['val']['token_acc']:.4f} (K = {args.k})")
    elif s.master:
        names = [common.FEATURE_NAMES[args.features][c] for c in TARGET_COLS[args.features]]
        print("L1 per standardised target (val): " + ", ".join(
            f"{n} {v:.3f}" for n, v in zip(names, result["val"]["l1_per_feature"])))
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
