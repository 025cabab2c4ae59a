"""Masked particle modelling (MPM): pretrain a jet encoder by hiding some particles and
predicting them from the rest (v1 arXiv 2401.13537; v2 arXiv 2409.12589, code mattcleigh/jetssl).

Idea: a jet is a set of particles, so BERT's recipe needs two changes. (1) A continuous particle
has no word to predict: it becomes a token, its nearest K-means centroid. (2) Identical mask
tokens in a set cannot be told apart: the k-th masked particle in pT order is identified by its
rank k, given only where the prediction is made (v1: rank at the head beat rank at the input).
This file is v2: the masked particles are removed from the encoder; a small decoder reads the
encoder outputs plus one learned "null" token per masked particle (the k-th gets vector k) and
predicts each one's centroid; a particle-ID task (type x charge, 8 classes, weight 0.3), an ID
embedding at the input and register tokens complete it. (v1's mask tokens in the encoder and
regression targets, which v2 superseded, are left out to keep the file short.)

How: jets stream through common.JetStream (bounded memory for any split). Masks are drawn on the
CPU per batch from a generator seeded by (seed, "masks", rank, step): ranks differ, and a resumed
run draws what the uninterrupted run drew; the encoder sees gathered index tensors, never a
boolean selection. K-means (mini-batch, Sculley 2010) and the target standardisation are fitted
once on --kmeans-jets jets of a shuffled epoch with its own seed (random files, all classes);
they are model buffers, so they travel with the checkpoint. Labels are nearest centroids in
float64: exact, and immune to TF32 (which changed 4.6% of the labels at K = 16,384 on the GPU).
The end-of-run linear probe (common.linear_probe) is fitted on a bounded train sample and scored
on val, for the pretrained encoder and for the same encoder at initialisation.

Inputs (--drop-features): with ParT's features, pt_log - logptrel = log pT_jet and e_log -
logerel = log E_jet from any visible particle, so E_jet minus the visible energy is the masked
particles' total: a conservation shortcut. Dropping the absolute logs would not close it (1 - the
visible pT fractions is the masked total); dropping the relative ones does: the default. The v2
talk's inputs are pT, deta, dphi, d0, d0err, dz, dzerr and the ID only; the preset feeds those.

--preset mpm-v2, v2 as far as published: encoder 512 wide, 8 blocks, 8 heads, 8 registers;
decoder 128 x 4; mask 0.4; K = 16,384, label smoothing 0.1; ID weight 0.3; AdamW lr 1e-3, wd
1e-5, 50k warm-up steps, batch 1000, 1M steps. It approaches (JetClass, 100M jets): probe 84.0%
(v1, K-means: 56.2%); fine-tuned 85.0-85.3% vs 84.3% from scratch (ParT 86.1%); about 68/75/82%
at 1k/10k/100k labels (scratch 48/60/76%).

Deviations, and why: ParT's features ("kin" on Top Tagging, which has no ID or impact parameters)
instead of quantile-transformed ones; the targets are v2's 7 quantities (3 with "kin"),
standardised, neutral particles' impact parameters set to 0 (v2's code put fresh noise there:
random labels). common's pre-norm GELU blocks (no SwiGLU, LayerScale, VQ-VAE or flow head);
warm-up then cosine. The class-attention jet vector is also a decoder context token, so
pretraining trains what the probe reads; the probe is fitted after training on detached vectors
(v2's online probe once leaked gradient into the backbone).

GPU:  python mpm.py --data jetclass --data-dir data/JetClass --preset mpm-v2
CPU:  OMP_NUM_THREADS=1 python mpm.py --n-jets 2000 --epochs 2 --k 64
"""
import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config -------------------------------------------------------------------------------------

SIZES = {  # --size; an explicit --dim etc. wins
    "small": dict(dim=64, depth=3, heads=4, n_registers=2, dec_dim=64, dec_depth=2, dec_heads=4),
    "v2": dict(dim=512, depth=8, heads=8, n_registers=8, dec_dim=128, dec_depth=4, dec_heads=4),
}
PRESETS = {  # --preset: a paper's recipe; its values become defaults, explicit flags still win
    "mpm-v2": dict(size="v2", mask_frac=0.4, k=16384,
                   label_smoothing=0.1, id_weight=0.3, lr=1e-3, weight_decay=1e-5, warmup=50_000,
                   batch_size=1000, steps=1_000_000, drop_features="e_log,logptrel,logerel,deltaR"),
}
CHECKS = [  # (flags, test, what a value must be): argparse reports a failure as a usage error
    (["k", "kmeans_jets", "kmeans_steps", "kmeans_batch", "log_every", "dim", "depth", "heads",
      "dec_dim", "dec_depth", "dec_heads"], lambda v: v > 0, "> 0"),
    (["id_weight", "n_registers"], lambda v: v >= 0, ">= 0"), (["mask_frac"], lambda v: 0 < v < 1,
    "in (0, 1)"), (["label_smoothing", "dropout"], lambda v: 0 <= v < 1, "in [0, 1)")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=1e-3, weight_decay=1e-5, batch_size=256, n_eval=10000)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a paper's recipe (docstring); explicit flags override its values")
    p.add_argument("--log-every", type=int, default=10, help="print a training line every N steps")
    g = p.add_argument_group("masking and targets")
    g.add_argument("--mask-frac", type=float, default=0.4,
                   help="fraction of each jet's real particles masked (floor(f n), in [1, n - 1])")
    g.add_argument("--k", type=int, default=512, help="K-means centroids (v1 512, v2 16384)")
    g.add_argument("--kmeans-jets", type=int, default=50_000,
                   help="jets (from random train files) K-means and target scales are fitted on")
    g.add_argument("--kmeans-steps", type=int, default=300, help="mini-batch K-means steps")
    g.add_argument("--kmeans-batch", type=int, default=4096, help="points per K-means step")
    g.add_argument("--label-smoothing", type=float, default=0.1,
                   help="of the token and ID cross-entropies (v2: 0.1)")
    g.add_argument("--id-weight", type=float, default=0.3,
                   help="weight of the particle-ID task (needs 'full' features; 0: off)")
    g.add_argument("--features", choices=["auto", "full", "kin"], default="auto",
                   help="auto: 'full' (with PID and impact parameters) except on toptagging")
    g.add_argument("--drop-features", default="logptrel,logerel", help="names left out of the "
                   "encoder input; the default closes the conservation shortcut (docstring)")
    g = p.add_argument_group("model")
    g.add_argument("--size", choices=list(SIZES), default="small", help="encoder/decoder sizes")
    for name in ("dim", "depth", "heads", "n-registers", "dec-dim", "dec-depth", "dec-heads"):
        g.add_argument(f"--{name}", type=int, default=None, help="None: from --size")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the encoder blocks")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)} must be {what}"
           for keys, ok, what in CHECKS for k in keys if not ok(getattr(args, k))]
    if args.features == "auto":
        args.features = "kin" if args.data == "toptagging" else "full"
    names = [common.FEATURE_NAMES[args.features][c] for c in input_cols(args.features)]
    bad += [f"--drop-features: {n!r} is not one of the '{args.features}' inputs {names}"
            for n in args.drop_features.split(",") if n and n not in names]
    if bad:
        p.error("; ".join(bad))
    return args


# --- the method: features and targets -----------------------------------------------------------
# "full" columns (common.FEATURE_NAMES): 0-4 kinematics, 5 charge, 6-10 PID flags (charged
# hadron, neutral hadron, photon, electron, muon), 11-14 tanh d0, d0err, tanh dz, dzerr, 15-16
# deta, dphi. "kin": 0-4 kinematics, 5-6 deta, dphi.
PID_COLS, N_PID = list(range(5, 11)), 8
# targets: v2's 7 quantities (pT, the 4 impact parameters, deta, dphi); 3 with "kin"
TARGET_COLS = {"full": [0, 11, 12, 13, 14, 15, 16], "kin": [0, 5, 6]}
IP_TARGETS = [1, 2, 3, 4]                                              # IP positions in TARGET_COLS
PAD = "batch"  # the encoder needs no fixed particle axis
CPU = torch.device("cpu")


def input_cols(features, drop=""):
    """Columns of the feature embedding: all but `drop` (comma-separated names); with "full"
    the charge and PID flags enter through the ID embedding instead."""
    names, dropped = common.FEATURE_NAMES[features], drop.split(",")
    return [c for c, n in enumerate(names)
            if n not in dropped and (features == "kin" or c not in PID_COLS)]


def pid_class(x):
    """(..., 17) "full" features -> (...,) int64 particle ID, type x charge as in MPM v2:
    0 photon, 1 neutral hadron, 2/3 charged hadron +/-, 4/5 electron +/-, 6/7 muon +/-."""
    neg, charged = (x[..., 5] < 0).long(), x[..., 5] != 0
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


def gather_rows(t, idx):
    """t (B, N, ...) gathered along N with idx (B, M) -> (B, M, ...)."""
    idx = idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, idx)


def front(select):
    """select (B, N) bool -> indices (B, M) of the selected slots first, in their order (so in
    pT order), and their validity (B, M); M = most selected in a jet, rounded up to 16."""
    B, N = select.shape
    pos = torch.arange(N).expand(B, N)
    idx = (pos + N * (~select).long()).argsort(1)
    return common.trim_batch(pos < select.sum(1, keepdim=True), idx)


def masked_batch(batch, args, generator, device):
    """A stream batch (CPU) -> masks -> the masked particles x_m (B, M, F) listed in pT order
    (position j = rank j among them) and the visible ones x (B, N', F), each with its validity,
    on `device`. Runs on the CPU, outside forward."""
    mask = make_mask(batch["valid"], args.mask_frac, generator)
    (valid_m, mask_idx), (valid, vis_idx) = front(mask), front(batch["valid"] & ~mask)
    out = dict(x_m=gather_rows(batch["x"], mask_idx), valid_m=valid_m,
               x=gather_rows(batch["x"], vis_idx), valid=valid)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


# --- the method: K-means ------------------------------------------------------------------------

def kmeans_assign(points, centroids):
    """Nearest centroid of each point (P, D) -> (P,) int64. Distances in float64: immune to
    autocast and to TF32 (on in common.setup for fp32 matmuls on the GPU), and free of the
    cancellation in |c|^2 - 2 p.c that reorders close centroids in fp32."""
    c = centroids.double()
    c2 = (c * c).sum(1)                                                  # (K,)
    rows = max(1, (1 << 24) // len(c))  # distance blocks of 16M entries (128 MB)
    with torch.autocast(points.device.type, enabled=False):
        out = [(c2 - 2 * p.double() @ c.T).argmin(1) for p in points.split(rows)]
    return torch.cat(out) if out else points.new_zeros(0, dtype=torch.long)


def fit_kmeans(points, k, steps, batch_size, generator):
    """Mini-batch K-means (Sculley 2010) on points (P, D): start from k distinct random points;
    each step assigns a random batch and moves every centroid to the running mean of all the
    points it has been assigned so far (per-centroid rate 1 / count)."""
    if len(points) < k:
        raise SystemExit(f"--k {k}: only {len(points)} training particles to fit K-means on; "
                         "lower --k or raise --kmeans-jets / --n-jets")
    dev = points.device
    centroids = points[torch.randperm(len(points), generator=generator)[:k].to(dev)].clone()
    counts = torch.zeros(k, dtype=points.dtype, device=dev)
    for _ in range(steps):
        batch = points[torch.randint(len(points), (batch_size,), generator=generator).to(dev)]
        label = kmeans_assign(batch, centroids)
        n = torch.bincount(label, minlength=k).to(points.dtype)
        counts += n
        sums = torch.zeros_like(centroids).index_add_(0, label, batch)
        centroids += (sums - n[:, None] * centroids) / counts.clamp(min=1)[:, None]
    return centroids


def fit_targets(stream, args, device):
    """Target mean/std and K-means centroids from the real particles of the first --kmeans-jets
    jets of one shuffled epoch of `stream` (its own seed: units from random files)."""
    t0, parts, n = time.time(), [], 0
    for batch in common.loader(stream, CPU):
        take = min(len(batch["valid"]), args.kmeans_jets - n)
        parts.append(raw_targets(batch["x"][:take][batch["valid"][:take]], args.features))
        n += take
        if n == args.kmeans_jets:
            break
    raw = torch.cat(parts).to(device)                                    # (P, D) real only
    mean, std = raw.mean(0), raw.std(0).clamp(min=1e-6)
    centroids = fit_kmeans((raw - mean) / std, args.k, args.kmeans_steps, args.kmeans_batch,
                           common.generator(args.seed, "kmeans-fit"))
    print(f"targets fitted on {len(raw)} particles of {n} jets in {time.time() - t0:.1f} s")
    return dict(mean=mean, std=std, centroids=centroids)


# --- the method: encoder, decoder, loss -------------------------------------------------------

class MPMEncoder(common.Encoder):
    """common.Encoder plus an ID embedding and register tokens. forward(x (B, N, F), valid
    (B, N)) -> tokens (B, N, C) (zero at padding), valid (B, N), jet (B, C) (class attention)."""

    def __init__(self, cfg):
        enc = {k: cfg[k] for k in ("dim", "heads", "depth", "mlp_ratio", "dropout")}
        super().__init__(common.EncoderConfig(in_dim=len(cfg["input_cols"]), cls_depth=1,
                                              embed_hidden=(cfg["dim"],), pair_dim=(), **enc))
        self.register_buffer("input_cols", torch.tensor(cfg["input_cols"]), persistent=False)
        self.pid_embed = nn.Embedding(N_PID, cfg["dim"]) if cfg["features"] == "full" else None
        self.registers = nn.Parameter(torch.randn(1, cfg["n_registers"], cfg["dim"]) * 0.02)

    def forward(self, x, valid):
        B, R = x.shape[0], self.registers.shape[1]
        x = torch.where(valid[..., None], x, 0.0)  # padding may hold anything
        h = self.embed(x[..., self.input_cols])                              # (B, N, C)
        if self.pid_embed is not None:
            h = h + self.pid_embed(pid_class(x))
        h = torch.cat([self.registers.expand(B, -1, -1).to(h.dtype), h], 1)  # (B, R + N, C)
        bias = common.attention_bias(torch.cat([valid.new_ones(B, R), valid], 1), None, h.dtype)
        for block in self.blocks:
            h = block(h, bias)
        h = h[:, R:]                                                         # (B, N, C)
        cls_bias = common.attention_bias(torch.cat([valid.new_ones(B, 1), valid], 1), None, h.dtype)
        cls = self.cls_token.expand(B, -1, -1)
        for block in self.cls_blocks:
            cls = block(cls, h, cls_bias)
        return self.norm(h) * valid[..., None], valid, self.norm(cls[:, 0])


def build_encoder(cfg):
    """The pretrained backbone from its config dict (a checkpoint's encoder_config)."""
    return MPMEncoder(dict(cfg))


def encoder_inputs(batch, cfg):
    """The encoder's forward kwargs from a stream batch (already on the device)."""
    return dict(x=batch["x"], valid=batch["valid"])


def batch_transform(cfg):
    return None  # particles only: no per-batch work in the loader workers


class MPM(nn.Module):
    """Encoder + decoder + output heads; forward returns the loss and its parts. The K-means
    centroids and target statistics are buffers: they travel with the weights, and DDP
    broadcasts rank 0's."""

    def __init__(self, args, enc_cfg, fit):
        super().__init__()
        self.features = args.features
        self.smoothing = args.label_smoothing
        self.id_weight = args.id_weight if args.features == "full" else 0.0
        self.encoder = build_encoder(enc_cfg)
        C = enc_cfg["dim"]
        for name, value in (("centroids", fit["centroids"]), ("t_mean", fit["mean"]),
                            ("t_std", fit["std"])):
            self.register_buffer(name, value.float())
        D = args.dec_dim
        self.dec_in = nn.Linear(C, D)
        # one learned vector per possible rank among the masked particles
        self.null = nn.Parameter(torch.randn(args.n_max, D) * 0.02)
        self.dec_blocks = nn.ModuleList(common.Block(D, args.dec_heads)
                                        for _ in range(args.dec_depth))
        self.dec_norm = nn.LayerNorm(D)
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
        """The encoder reads the visible particles only; the decoder -> (B, M, D), one row per
        masked particle, for the output heads."""
        h, v = self.decoder_input(*self.encoder(b["x"], b["valid"]), b["valid_m"])
        bias = common.attention_bias(v, None, h.dtype)
        for block in self.dec_blocks:
            h = block(h, bias)
        return self.dec_norm(h[:, -b["valid_m"].shape[1]:])

    def labels(self, x_m):
        """(B, M, F) masked particles -> (B, M) K-means labels of their standardised targets."""
        t = (raw_targets(x_m, self.features) - self.t_mean) / self.t_std
        return kmeans_assign(t.flatten(0, 1), self.centroids).view(t.shape[:2])

    def forward(self, b):
        vm = b["valid_m"].float()
        n = vm.sum().clamp(min=1)
        h = self.predict(b)
        out = self.head(h).float()
        with torch.no_grad():
            label = self.labels(b["x_m"])                                   # (B, M)
        ce = F.cross_entropy(out.flatten(0, 1), label.flatten(), reduction="none",
                             label_smoothing=self.smoothing)
        loss = (ce * vm.flatten()).sum() / n
        stats = dict(token_loss=loss.detach(),
                     token_acc=((out.argmax(-1) == label).float() * vm).sum() / n)
        if self.id_head is not None:
            ce = F.cross_entropy(self.id_head(h).float().flatten(0, 1),
                                 pid_class(b["x_m"]).flatten(), reduction="none",
                                 label_smoothing=self.smoothing)
            stats["id_loss"] = (ce * vm.flatten()).sum() / n
            loss = loss + self.id_weight * stats["id_loss"]
        return loss, stats


@torch.no_grad()
def evaluate(raw_model, stream, args, s):
    """Pretext loss and masked-token accuracy on the val stream, with the same masks at every
    evaluation (a generator of its own, made afresh)."""
    raw_model.eval()
    gen, sums, n = common.generator(args.seed, "eval-masks"), {}, 0.0
    for batch in common.loader(stream, CPU):
        b = masked_batch(batch, args, gen, s.device)
        with s.ctx:
            loss, stats = raw_model(b)
        w = float(b["valid_m"].sum())
        for k, v in dict(loss=loss, **stats).items():
            sums[k] = sums.get(k, 0.0) + v.detach().double().cpu() * w
        n += w
    raw_model.train()
    return {k: (v / max(n, 1)).tolist() for k, v in sums.items()}


# --- training -----------------------------------------------------------------------------------

def train(args, jets=None):
    """Pretrain; jets: optional {"train": common.Jets, "val": common.Jets} streamed instead of
    args.data (tests, notebooks). Returns the final metrics."""
    s = common.setup(args)
    print(f"mpm: {vars(args)}\ngit {common.git_hash()} {common.versions()} device {s.device}")

    def stream(split, **kw):  # every split streams: bounded memory whatever its size
        return common.JetStream(jets[split] if jets else args.data, split, path=args.data_dir,
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
    enc_cfg = dict(features=args.features, input_cols=input_cols(args.features, args.drop_features),
                   dim=args.dim, heads=args.heads, depth=args.depth, mlp_ratio=4,
                   dropout=args.dropout, n_registers=args.n_registers)
    torch.manual_seed(args.seed)
    raw_model = MPM(args, enc_cfg, fit).to(s.device)
    init_encoder = copy.deepcopy(raw_model.encoder.state_dict())  # the probe's floor
    print(f"encoder {sum(p.numel() for p in raw_model.encoder.parameters()):,} parameters; with "
          f"decoder and heads {sum(p.numel() for p in raw_model.parameters()):,}")
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start_step = common.resume_from(args.resume, raw_model, optimizer) if args.resume else 0
    model = common.wrap_model(raw_model, s)
    log = common.JsonlLogger(Path(args.out) / "mpm.jsonl") if s.master else None
    # --- training loop: 1. batch + masks (CPU)  2. forward  3. backward + step
    bar = common.progress_bar(total, args.batch_size * s.world_size, start_step, s.master)
    record, t0 = None, time.time()
    for step, epoch, batch in common.train_batches(train_stream, CPU, args.epochs, steps=args.steps,
                                                   start_step=start_step):
        # masks from (seed, rank, step) alone: ranks differ, and resume needs no mask state
        b = masked_batch(batch, args, common.generator(args.seed, "masks", s.rank, step), s.device)
        lr = common.lr_at(step, total, warmup, args.lr)
        common.set_lr(optimizer, lr)
        with s.ctx:
            loss, stats = model(b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        bar.update(args.batch_size * s.world_size)
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            lossf = loss.item()  # the one host sync, every --log-every steps
            common.check_finite(loss, step + 1, train_stream.describe(batch["source"][0]))
            bar.set_postfix(loss=f"{lossf:.4f}")
            if s.master:
                bar.write(f"step {step + 1}/{total}: loss {lossf:.4f}, lr {lr:.2e}, "
                          f"dt {1000 * dt:.0f} ms")
        if s.master and ((step + 1) % eval_every == 0 or step + 1 == total):
            common.check_finite(loss, step + 1)
            record = dict(step=step + 1, epoch=epoch, loss=loss.item(),
                          val=evaluate(raw_model, val_stream, args, s))
            log.log(record)
            bar.write(f"step {step + 1}: val loss {record['val']['loss']:.4f}, masked-token "
                      f"accuracy {record['val']['token_acc']:.4f}")
            common.save_checkpoint(Path(args.out) / "mpm.pt", method="mpm", args=args,
                                   model=raw_model, encoder=raw_model.encoder,
                                   encoder_config=enc_cfg, optimizer=optimizer, step=step + 1)
            t0 = time.time()  # the next dt is a training step's, not the evaluation's
    bar.close()
    # --- end of run: the linear probe (fit: bounded train sample, score: val), also at init
    result = dict(steps=total, loss=record and record["loss"], val=record and record["val"])
    if s.master:
        fit_stream = stream("train", n_jets=args.n_eval or 20_000, shuffle=False, drop_last=False)
        random_encoder = build_encoder(enc_cfg).to(s.device)
        random_encoder.load_state_dict(init_encoder)
        for name, enc in (("probe", raw_model.encoder), ("probe_random", random_encoder)):
            z_fit, y_fit = common.embed_stream(enc, fit_stream, s.device, s.ctx, ("x", "valid"))
            z_val, y_val = common.embed_stream(enc, val_stream, s.device, s.ctx, ("x", "valid"))
            result[name] = {k: v for k, v in common.linear_probe(z_fit, y_fit, z_val, y_val).items()
                            if k != "per_class"}
        print(f"linear probe (common.linear_probe, fitted on {len(y_fit)} train jets, scored on "
              f"{len(y_val)} val jets): " + "; ".join(
                  f"{name} acc {m['acc']:.4f} auc {m['auc']:.4f}" for name, m in
                  (("pretrained", result["probe"]), ("random init", result["probe_random"]))))
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
