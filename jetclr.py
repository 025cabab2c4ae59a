"""JetCLR: contrastive pretraining of a jet encoder with physical augmentations. Kin-only: the
encoder reads 4-vectors and recomputes the 7 ParT "kin" features from them (no particle ID, no
impact parameters), so finetune.py can read it on any data, Top Tagging included.

Idea (Dillon et al., arXiv 2108.04253; scaling study arXiv 2408.09343): two augmented views of a
jet should map to nearby points on the unit sphere, views of different jets to distant ones. The
augmentations are symmetries a tagger should respect: rotation about the jet axis, translation
in (eta, phi), smearing of (eta, phi) by N(0,1) x 0.1 GeV / pT (soft particles are poorly
measured), collinear splitting of a particle into z, 1-z. Loss: NT-Xent (cosine similarity,
temperature 0.1) over every view of the global batch, 2 x B x W for W processes (as SimCLR), so
the task does not change with the number of GPUs. Quality: the linear classifier test (LCT).

How: batched augmentations of 4-vectors on the device, drawn from a CPU generator seeded by
(seed, "aug", rank, step), so CPU, GPU and resumed runs see the same views. Per view, in this
order: 1. measure the translation range; 2. collinear splitting into free padding slots (each
particle with probability --split-prob, never beyond --n-max; the paper fills jets up to 50);
3. rotation; 4. smearing (width capped at 0.8); 5. translation. The 7 ParT "kin" features are
then recomputed from the 4-vectors, (deta, dphi) from the un-augmented axis so the translation
shows (the paper: (pT, eta, phi) of 50 particles). Encoder: common.Encoder, pT-weighted sum
pooling; head 2 x [ReLU, Linear]; AdamW with warm-up and cosine decay.

Choices, and where this file differs from the paper / public code (bmdillon/JetCLR):
- Pooling `ptsum` (the default and the paper's): a token enters the jet vector with weight
  pT_i/pT_jet, so a particle adds nothing as its pT -> 0 (IR safety) and collinear fragments
  weigh z and 1-z; class attention (`cls`) gives a soft particle a weight that does not vanish.
  The attention is not IRC-safe by construction (the paper adds 0.5 log pT to its logits; the
  shared blocks offer a ParT pair bias, --pair-bias): the splitting teaches collinear safety.
- Translation: one shift per jet, U(+-w x extent) in eta and in phi, extent = max - min over the
  real particles, w = --translate-width = 1 (the public code's), measured before the other
  augmentations (the public code: after rotating and smearing, with the padding at 0 counted).
- LCT: nanojet's one probe protocol, common.linear_probe fitted on a bounded sample of the TRAIN
  split (min(--n-eval, --n-jets) jets; labels used only here) and scored on --n-eval VAL jets
  (the public code fits and scores on halves of its training file), on the encoder output (what
  finetune.py uses) and the first head layer (what the public code probes). Also not repeated:
  smeared padding, pT lost in splits, validation views that drift, a GPU-only pipeline.

GPU:  python jetclr.py --data jetclass --data-dir data/jetclass --steps 20000 --workers 8
CPU:  OMP_NUM_THREADS=1 python jetclr.py --n-jets 1000 --epochs 2 --dim 32 --depth 2 --n-eval 500
"""
import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config -------------------------------------------------------------------------------------

# the paper's recipe (arXiv 2108.04253, public code; scaling study arXiv 2408.09343): width 1000,
# 4 blocks of 4 heads, pT-weighted sum, temperature 0.1, Adam lr 5e-5, batch 128, 500 epochs on
# 100k jets, 50 particles, every augmentation at the public code's strength. Not reproduced:
# the 0.5 log pT added to the attention logits, and inputs (pT, eta, phi) instead of 7 "kin".
PRESETS = {"paper": dict(dim=1000, depth=4, heads=4, pooling="ptsum", nt_xent_temperature=0.1,
                         lr=5e-5, batch_size=128, epochs=500, n_max=50, translate_width=1.0,
                         smear_gev=0.1, rotate=True)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=5e-4, batch_size=256, n_eval=20000)
    g = p.add_argument_group("augmentations (each view drawn independently; 0 turns one off)")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="rotate (deta, dphi) about the jet axis by an angle U[0, 2pi)")
    g.add_argument("--translate-width", type=common.nonneg_float, default=1.0,
                   help="shift each jet by U(+-width x its extent) in eta and in phi")
    g.add_argument("--smear-gev", type=common.nonneg_float, default=0.1,
                   help="smear eta and phi of each particle by N(0,1) x smear-gev / pT")
    g.add_argument("--split-prob", type=common.unit, default=0.5,
                   help="probability of a collinear split (z ~ U(0,1)) of each particle")
    g = p.add_argument_group("model and loss")
    g.add_argument("--dim", type=common.positive_int, default=64, help="encoder width")
    g.add_argument("--heads", type=common.positive_int, default=4, help="attention heads")
    g.add_argument("--depth", type=common.nonneg_int, default=4,
                   help="particle self-attention blocks")
    g.add_argument("--cls-depth", type=common.positive_int, default=2,
                   help="class blocks (--pooling cls)")
    g.add_argument("--pair-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="add ParT pair features as attention bias")
    g.add_argument("--pooling", choices=["ptsum", "cls"], default="ptsum",
                   help="jet vector: pT-weighted sum of tokens (IR-safe) or class attention")
    g.add_argument("--proj-dim", type=common.positive_int, default=64,
                   help="projection head output size")
    g.add_argument("--nt-xent-temperature", type=common.positive_float, default=0.1,
                   help="temperature of the NT-Xent softmax over cosine similarities")
    g = p.add_argument_group("evaluation")
    g.add_argument("--lct", action=argparse.BooleanOptionalAction, default=True,
                   help="end of run: linear classifier test (fitted on train, scored on val)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named recipe: its values replace the defaults; flags given still win")
    pre, _ = p.parse_known_args(argv)
    if pre.preset:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be divisible by --heads {args.heads}")
    return args


# --- the method: 4-vectors <-> centred (pT, deta, dphi, m) ---------------------------------------

def jet_axis(p4, valid):
    """(eta, phi) of the summed valid 4-vectors: the frame all augmentations refer to. (B, 2)"""
    j = (p4 * valid.unsqueeze(-1)).sum(1)  # (B, 4)
    pt = torch.hypot(j[:, 0], j[:, 1]).clamp_min(1e-6)
    return torch.stack([torch.asinh(j[:, 2] / pt), torch.atan2(j[:, 1], j[:, 0])], -1)


def to_centred(p4, valid, axis):
    """(B, N, 4) (px, py, pz, E) -> (B, N, 4) (pT, eta - jet_eta, wrapped phi - jet_phi, m)."""
    pt = torch.hypot(p4[..., 0], p4[..., 1])
    # a real particle can have pT 0: a split draws z = 0 with probability 2^-24, about once in
    # 2,000 steps of 128 jets, and asinh(0 / 0) would make the batch's loss NaN
    safe = torch.where(valid & (pt > 0), pt, torch.ones_like(pt))
    eta, phi = torch.asinh(p4[..., 2] / safe), torch.atan2(p4[..., 1], p4[..., 0])
    m = (p4[..., 3] ** 2 - (p4[..., :3] ** 2).sum(-1)).clamp_min(0).sqrt()
    dphi = common.wrap_phi(phi - axis[:, None, 1])  # common's numpy helper works on tensors too
    c = torch.stack([pt, eta - axis[:, None, 0], dphi, m], -1)
    return c * valid.unsqueeze(-1)


def from_centred(c, valid, axis):
    pt, m = c[..., 0], c[..., 3]
    eta, phi = c[..., 1] + axis[:, None, 0], c[..., 2] + axis[:, None, 1]
    p = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)
    e = torch.sqrt(m ** 2 + (pt * torch.cosh(eta)) ** 2)
    return torch.cat([p, e.unsqueeze(-1)], -1) * valid.unsqueeze(-1)


# --- the method: augmentations -------------------------------------------------------------------

def augment(p4, valid, axis, gen, rotate=True, translate=1.0, smear=0.1, split=0.5, smear_max=0.8):
    """One random view of a batch. p4 (B, N, 4), valid (B, N) -> (p4', valid'). Order: measure
    the translation range, split, rotate, smear, translate (the public code rotates first; a
    rotation about the axis commutes with a collinear split). translate/smear/split = 0 turn one
    off. Random numbers come from `gen` (CPU) and are moved to p4's device; padding stays zero
    unless a split particle is placed there. smear_max caps the smearing width (radians): 0.1 GeV
    / pT exceeds the jet radius below 125 MeV, and an unbounded width sends eta to inf in cosh."""
    B, N, _ = p4.shape
    dev = p4.device
    rand = lambda *shape: torch.rand(*shape, generator=gen).to(dev)  # noqa: E731

    c = to_centred(p4, valid, axis)  # (B, N, 4): pT, deta, dphi, m
    # translation range: peak-to-peak of the real particles, before anything moves them
    angles = torch.where(valid[..., None], c[..., 1:3], torch.nan)  # (B, N, 2)
    big = torch.finfo(c.dtype).max
    extent = (angles.nan_to_num(-big).amax(1) - angles.nan_to_num(big).amin(1)).clamp_min(0)
    if split > 0:
        # rank the real particles in a random order; the k-th chosen one goes to the k-th free slot
        u = rand(B, N)
        z = rand(B, N)
        key = torch.where(valid, u, 2.0)  # padding never chosen
        order = key.argsort(dim=1, stable=True)  # (B, N) slot of the particle with rank k
        k = torch.arange(N, device=dev).expand(B, N)
        chosen = (key.gather(1, order) < split) & (k < (~valid).sum(1, keepdim=True))  # per rank
        # free slots in slot order (valid slots sort after them): children fill the first ones,
        # so valid-first order (which trim_batch relies on) survives
        dest = (valid.long() * N + k).argsort(1)  # (B, N) k-th free slot
        zk = torch.where(chosen, z, 0.0)  # (B, N) fraction carried away by the child of rank k
        is_mom = torch.tensor([True, False, False, True], device=dev)  # pT, m scale; angles stay
        parent = c.gather(1, order[..., None].expand(-1, -1, 4))  # (B, N, 4) per rank
        child = torch.where(is_mom, parent * zk[..., None], parent)
        keep = torch.ones_like(z).scatter(1, order, 1 - zk)  # (B, N) per slot: parent keeps 1 - z
        c = torch.where(is_mom, c * keep[..., None], c)
        dest4 = dest[..., None].expand(-1, -1, 4)
        c = c.scatter(1, dest4, torch.where(chosen[..., None], child, c.gather(1, dest4)))
        valid = valid.scatter(1, dest, chosen | valid.gather(1, dest))
    pt, deta, dphi, m = c.unbind(-1)
    if rotate:
        a = 2 * math.pi * rand(B, 1)
        cos, sin = torch.cos(a), torch.sin(a)
        deta, dphi = cos * deta - sin * dphi, sin * deta + cos * dphi
    if smear > 0:
        sigma = (smear / torch.where(valid, pt, torch.ones_like(pt))).clamp(max=smear_max)
        noise = torch.randn(2, B, N, generator=gen).to(dev)
        deta, dphi = deta + noise[0] * sigma, dphi + noise[1] * sigma
    if translate > 0:
        shift = translate * extent * (2 * rand(B, 2) - 1)  # (B, 2): one shift per jet
        deta, dphi = deta + shift[:, :1], dphi + shift[:, 1:]
    c = torch.stack([pt, deta, common.wrap_phi(dphi), m], -1) * valid.unsqueeze(-1)
    return from_centred(c, valid, axis), valid


# --- the method: features, encoder, head, loss -------------------------------------------------

def kin_features(p4, valid, axis=None):
    """ParT "kin" features (pt_log, e_log, logptrel, logerel, deltaR, deta, dphi) with ParT's
    standardisation, from 4-vectors. (deta, dphi) are measured from `axis` (B, 2) (default: the
    jet's own axis); jet pT and E are those of the summed real particles. -> (B, N, 7)"""
    axis = jet_axis(p4, valid) if axis is None else axis
    c = to_centred(p4, valid, axis)
    one = torch.ones_like(c[..., 0])
    pt = torch.where(valid, c[..., 0], one)
    e = torch.where(valid, p4[..., 3], one).clamp_min(1e-6)
    j = (p4 * valid.unsqueeze(-1)).sum(1)  # (B, 4)
    jet_pt = torch.hypot(j[:, 0], j[:, 1]).clamp_min(1e-6)[:, None]
    jet_e = j[:, 3].clamp_min(1e-6)[:, None]
    # ParT's sign convention: deta flips sign for jets at negative eta
    deta, dphi = c[..., 1] * torch.where(axis[:, 0:1] < 0, -1.0, 1.0), c[..., 2]
    f = torch.stack(common.kin_columns(pt, e, deta, dphi, jet_pt, jet_e), -1)
    f = torch.cat([f.clamp(-5, 5), deta.unsqueeze(-1), dphi.unsqueeze(-1)], -1)
    return torch.where(valid.unsqueeze(-1), f, 0.0)


class JetCLREncoder(nn.Module):
    """4-vectors -> (tokens (B, T, C), tok_valid (B, T), jet (B, C)). Reads only (valid, p4):
    the features are recomputed here so that augmented and real jets go through the same code."""

    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        self.pooling = cfg.pop("pooling")
        self.backbone = common.Encoder(common.EncoderConfig(**cfg))

    def forward(self, valid, p4, axis=None):
        x = kin_features(p4, valid, axis)
        tokens, tok_valid, jet = self.backbone(x, valid, p4)
        if self.pooling == "ptsum":
            pt = torch.hypot(p4[..., 0], p4[..., 1]) * tok_valid
            w = pt / pt.sum(1, keepdim=True).clamp_min(1e-6)  # (B, T)
            jet = torch.einsum("bt,btc->bc", w.to(tokens.dtype), tokens)
        return tokens, tok_valid, jet


# the method-module interface that finetune.py and study.py use
PAD = "batch"  # the encoder alone needs no free slots (only the training views do)


def build_encoder(cfg):
    return JetCLREncoder(cfg)


def encoder_inputs(batch, cfg):
    return dict(valid=batch["valid"], p4=batch["p4"])


def batch_transform(cfg):
    return None


class JetCLR(nn.Module):
    def __init__(self, cfg, proj_dim):
        super().__init__()
        self.encoder = JetCLREncoder(cfg)
        C = cfg["dim"]
        # 2 x [ReLU, Linear] as in the paper; the LCT also reads the first layer's output
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, proj_dim))

    def forward(self, valid, p4, axis):  # -> projections (B, proj_dim)
        return self.head(self.encoder(valid, p4, axis)[2])


def nt_xent(z, temperature=0.1, gather=False):
    """z (2B, D) = [view 1; view 2] of B jets -> NT-Xent: each view's positive is its partner,
    every other view a negative; cosine similarities and the softmax in fp32. gather: over the
    2 x B x W views of all W ranks (SimCLR's global batch), the same value on every rank. Other
    ranks' views arrive detached, so each rank back-propagates through its own views only and
    DDP's average of the W gradients is 1/W of the global loss's: backward (loss x W)."""
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.detach().contiguous())
        parts[dist.get_rank()] = z
        z = torch.cat([q.chunk(2)[0] for q in parts] + [q.chunk(2)[1] for q in parts])
    z = F.normalize(z.float(), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(z), device=z.device).roll(len(z) // 2))


# --- training -----------------------------------------------------------------------------------

def encoder_config(args):
    # pT-weighted pooling needs no class blocks (unused parameters would also stall DDP)
    cls_depth = args.cls_depth if args.pooling == "cls" else 0
    enc = common.EncoderConfig(in_dim=7, dim=args.dim, heads=args.heads, depth=args.depth,
                               cls_depth=cls_depth, pair_dim=(32, 32) if args.pair_bias else ())
    return dict(asdict(enc), pooling=args.pooling)  # flat: checkpoints store plain values


def two_views(p4, valid, gen, args):
    """Two independent views of each jet, stacked: (2B, T, 4), (2B, T), axis (2B, 2). The stream
    keeps all n_max slots (pad="n_max") for the splits; the particle axis is trimmed only now."""
    axis = jet_axis(p4, valid)
    kw = dict(rotate=args.rotate, translate=args.translate_width, smear=args.smear_gev,
              split=args.split_prob)
    (a, va), (b, vb) = augment(p4, valid, axis, gen, **kw), augment(p4, valid, axis, gen, **kw)
    valid, p4 = common.trim_batch(torch.cat([va, vb]), torch.cat([a, b]))
    return valid, p4, torch.cat([axis, axis])


@torch.no_grad()
def val_loss(raw_model, stream, s, args):
    """Contrastive loss over every jet of `stream` (a short last batch has fewer negatives); the
    views come from a fresh generator each time, so they never drift (as the public code's did)."""
    raw_model.eval()
    gen = common.generator(args.seed, "val-aug")
    total = 0.0
    n = 0
    for batch in common.loader(stream, s.device):
        valid, p4, axis = two_views(batch["p4"], batch["valid"], gen, args)
        with s.ctx:
            z = raw_model(valid, p4, axis)
        total += nt_xent(z, args.nt_xent_temperature).item() * len(z)
        n += len(z)
    raw_model.train()
    return common.check_val_loss(total / n, f"{args.data} val")


def lct(raw_model, cfg, s, args, source):
    """Linear classifier test: common.linear_probe on frozen, un-augmented readouts, fitted on a
    bounded sample of the train split and scored on --n-eval val jets. source(split): the data
    of a split (a source name or Jets)."""
    n_fit = min(args.n_eval or 20000, args.n_jets or args.n_eval or 20000)
    kw = dict(path=args.data_dir, n_max=args.n_max, batch_size=args.batch_size, shuffle=False,
              drop_last=False, workers=args.workers, pad=PAD)

    def readouts(split, n_jets):  # (N, 2C): [encoder output h, first head layer], labels (N,)
        stream = common.JetStream(source(split), split, n_jets=n_jets, **kw)
        h, y = common.embed_stream(raw_model.encoder, stream, s.device, s.ctx,
                                   lambda b: encoder_inputs(b, cfg))
        with torch.no_grad():
            g = raw_model.head[1](raw_model.head[0](h.to(s.device))).float().cpu()
        return torch.cat([h, g], 1), y
    (z_fit, y_fit), (z_val, y_val) = readouts("train", n_fit), readouts("val", args.n_eval)
    result = {}
    C = cfg["dim"]
    for name, cols in (("repr", slice(0, C)), ("head1", slice(C, 2 * C))):
        m = common.linear_probe(z_fit[:, cols], y_fit, z_val[:, cols], y_val)
        result.update({f"lct_{name}_{k}": v for k, v in m.items() if k != "per_class"})
        print(f"LCT {name:5s} (logistic regression fitted on {len(y_fit)} train jets, scored on "
              f"{len(y_val)} val jets): acc {m['acc']:.4f} AUC {m['auc']:.4f} "
              f"1/eps_B(0.5) {m['rej50']:.1f}")
    return result


def train(args, data=None):
    """Pretrain; returns the last evaluation's and the LCT's figures. data: {split: Jets}
    streamed instead of the --data files (tests)."""
    s = common.setup(args)
    common.claim_output(Path(args.out) / "jetclr.pt", args)
    out = Path(args.out)

    def source(split):  # what a split streams: --data's files, or the jets given
        return data[split] if data is not None else args.data

    # collinear splitting fills free slots: the training stream keeps all n_max of them
    train_stream = common.JetStream(
        source("train"), "train", path=args.data_dir, n_jets=args.n_jets, n_max=args.n_max,
        batch_size=args.batch_size, seed=args.seed, rank=s.rank, world_size=s.world_size,
        shuffle_buffer=args.shuffle_buffer, workers=args.workers, transform=None, pad="n_max")
    cfg = encoder_config(args)
    raw_model = JetCLR(cfg, args.proj_dim).to(s.device)
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start = common.resume_from(args.resume, raw_model, optimizer, args=args,
                               data=train_stream.identity) if args.resume else 0
    model = common.wrap_model(raw_model, s)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    eval_every = args.eval_every or len(train_stream)
    jets_per_step = args.batch_size * s.world_size
    logger = (common.JsonlLogger(out / "jetclr.jsonl", resume_step=start if args.resume else None)
              if s.master else None)
    if s.master:
        # the validation loss sees as many negatives as a training step: batches of B x W jets
        val_stream = common.JetStream(
            source("val"), "val", path=args.data_dir, n_jets=args.n_eval, n_max=args.n_max,
            batch_size=jets_per_step, shuffle=False, drop_last=False, workers=args.workers,
            pad="n_max")
        n_params = sum(p.numel() for p in raw_model.encoder.parameters())
        print(f"jetclr: {args.data} {train_stream.n} train jets/epoch, {total} steps x "
              f"{jets_per_step} jets, encoder {n_params / 1e6:.2f}M params ({args.pooling}), "
              f"lr {args.lr:g}, {s.device}, git {common.git_hash()}; full config in {logger.path}")
        logger.log(dict(config=vars(args), start_step=start, world_size=s.world_size,
                        git=common.git_hash(), versions=common.versions()))

    bar = common.progress_bar(total, jets_per_step, start, s.master)
    result = dict(loss=float("nan"))
    t0 = time.time()
    for step, epoch, batch in common.train_batches(train_stream, s.device, args.epochs,
                                                   steps=args.steps, start_step=start):
        # 1. two augmented views; the numbers are a pure function of (seed, rank, step), so a
        #    resumed run draws the same ones on every rank without saved generator states
        common.set_lr(optimizer, common.lr_at(step, total, warmup, args.lr))
        with torch.no_grad():
            gen = common.generator(args.seed, "aug", s.rank, step)
            valid, p4, axis = two_views(batch["p4"], batch["valid"], gen, args)
        # 2. forward: projections of both views; NT-Xent over the global batch, in fp32
        with s.ctx:
            z = model(valid, p4, axis)  # (2B, proj_dim)
        loss = nt_xent(z, args.nt_xent_temperature, gather=True)
        # 3. backward (x W: see nt_xent) + step
        optimizer.zero_grad(set_to_none=True)
        (loss * s.world_size).backward()
        common.check_finite(loss, step, f"{args.data} train")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        t1 = time.time()  # nanoGPT's timing: one dt per step, no synchronisation
        dt = t1 - t0
        t0 = t1
        bar.update(jets_per_step)
        if (step + 1) % args.log_every == 0 and s.master:
            lossf = loss.item()
            bar.set_postfix(loss=f"{lossf:.4f}")
            bar.write(f"step {step + 1}/{total}: loss {lossf:.4f}, "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}, dt {dt * 1000:.1f} ms")
        if ((step + 1) % eval_every == 0 or step + 1 == total) and s.master:
            vl = val_loss(raw_model, val_stream, s, args)
            bar.write(f"step {step + 1}/{total} (epoch {epoch}): val loss {vl:.4f} "
                      f"over {val_stream.n} val jets")
            result = dict(step=step + 1, epoch=epoch, loss=loss.item(), val_loss=vl)
            logger.log(result)
            common.save_checkpoint(out / "jetclr.pt", method="jetclr", args=args, model=raw_model,
                                   encoder=raw_model.encoder, encoder_config=cfg,
                                   optimizer=optimizer, step=step + 1,
                                   data=train_stream.identity)
            t0 = time.time()  # the evaluation is not part of the next step's dt
    bar.close()
    if args.lct and s.master and common.probe_possible(train_stream):
        result.update(lct(raw_model, cfg, s, args, source))
        logger.log(result)
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
