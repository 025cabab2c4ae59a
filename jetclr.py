"""JetCLR: contrastive pretraining of a jet encoder with physical augmentations.

Idea (Dillon et al., arXiv 2108.04253; scaling study arXiv 2408.09343): two randomly augmented
views of a jet should map to nearby points on the unit sphere, views of different jets to distant
ones. The augmentations are the symmetries a tagger should respect: rotation about the jet axis,
translation in (eta, phi), smearing of (eta, phi) by N(0,1) x 0.1 GeV / pT (soft particles are
poorly measured), collinear splitting of a particle into z, 1-z at the same (eta, phi). Loss:
NT-Xent (cosine similarity, temperature 0.1). Quality: the linear classifier test (LCT), a
logistic regression on frozen representations.

How: augmentations act on whole batches of 4-vectors on the device, with random numbers drawn on
the CPU from a generator seeded by (seed, "aug", rank, step), so CPU, GPU and resumed runs draw
the same views. Per view, in this order: 1. measure the translation range on the real,
un-augmented particles; 2. collinear splitting; 3. rotation; 4. smearing; 5. translation. The 7
ParT "kin" features are then recomputed from the augmented 4-vectors, (deta, dphi) from the
un-augmented jet axis so that the network sees the translation. Encoder: common.Encoder (pair
bias off), pT-weighted sum pooling, then a 2 x [ReLU, Linear] projection head.

Choices and deviations from the paper / public code (bmdillon/JetCLR):
- Pooling `ptsum` (default, the paper's): a token enters the jet vector with weight
  pT_i / pT_jet, so a soft particle's token adds nothing as pT -> 0 (IR safety) and collinear
  fragments weigh z and 1-z of their parent; class attention (`cls`) gives a soft particle a
  weight that does not vanish with its pT. The attention blocks are not IRC-safe by construction
  (the paper adds 0.5 log pT to the attention logits; the shared blocks take a ParT pair bias
  instead, --pair-bias): the splitting augmentation teaches collinear safety.
- Translation: one shift per jet, U(+-w x extent) in eta and in phi, extent = max - min over the
  real particles, w = --translate-width = 1 (the public code's), measured before the other
  augmentations (the public code measured it after rotating and smearing, padding included).
- Inputs: 7 "kin" features of up to --n-max particles, not (pT, eta, phi) of 50. Splitting:
  each real particle with probability --split-prob while free slots last (never beyond
  --n-max), not "fill up to 50"; before the rotation (they commute). Smearing width capped at 0.8.
- Negatives: every view of the global batch, 2 x B x W for W processes (SimCLR), so the task
  does not change with the number of GPUs (nt_xent_global).
- LCT: nanojet's one probe protocol, common.linear_probe fitted on a bounded sample of the TRAIN
  split (min(--n-eval, --n-jets) jets; their labels are used only here) and scored on --n-eval
  VAL jets (the public code fitted and scored on halves of its training file). Readouts: the
  encoder output (what finetune.py uses) and the first head layer (what the public code probed).
- Public-code bugs not repeated: padding is never smeared or counted in the translation range; no
  jet loses pT in the splitting; validation views never drift; everything runs on a CPU.
- Optimiser: AdamW, warm-up + cosine decay (common's), lr 5e-4 for the small encoder.

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


def _number(cast, ok, what):  # an argparse type: parse, then check the value
    def parse(text):
        value = cast(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=5e-4, batch_size=256, n_eval=20000)
    g = p.add_argument_group("augmentations (each view drawn independently; 0 turns one off)")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="rotate (deta, dphi) about the jet axis by an angle U[0, 2pi)")
    g.add_argument("--translate-width", type=nonneg_float, default=1.0,
                   help="shift each jet by U(+-width x its extent) in eta and in phi")
    g.add_argument("--smear-gev", type=nonneg_float, default=0.1,
                   help="smear eta and phi of each particle by N(0,1) x smear-gev / pT")
    g.add_argument("--split-prob", type=fraction, default=0.5,
                   help="probability that a real particle is split collinearly (z ~ U(0,1)), "
                        "while free padding slots last")
    g = p.add_argument_group("model and loss")
    g.add_argument("--dim", type=positive_int, default=64, help="encoder width")
    g.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    g.add_argument("--depth", type=nonneg_int, default=4, help="particle self-attention blocks")
    g.add_argument("--cls-depth", type=positive_int, default=2,
                   help="class-attention blocks (only with --pooling cls)")
    g.add_argument("--pair-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="add ParT pair features as attention bias")
    g.add_argument("--pooling", choices=["ptsum", "cls"], default="ptsum",
                   help="jet vector: pT-weighted sum of the tokens (IR-safe, the paper's) or a "
                        "class-attention token")
    g.add_argument("--proj-dim", type=positive_int, default=64, help="projection head output size")
    g.add_argument("--nt-xent-temperature", type=positive_float, default=0.1,
                   help="temperature of the NT-Xent softmax over cosine similarities")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--lct", action=argparse.BooleanOptionalAction, default=True,
                   help="end of run: linear classifier test, fitted on min(--n-eval, --n-jets) "
                        "train jets and scored on --n-eval val jets")
    g.add_argument("--log-every", type=positive_int, default=10, help="print the loss every N steps")
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
    safe = torch.where(valid, pt, torch.ones_like(pt))
    eta = torch.asinh(p4[..., 2] / safe)
    phi = torch.atan2(p4[..., 1], p4[..., 0])
    m = (p4[..., 3] ** 2 - (p4[..., :3] ** 2).sum(-1)).clamp_min(0).sqrt()
    dphi = common.wrap_phi(phi - axis[:, None, 1])  # common's numpy helper works on tensors too
    c = torch.stack([pt, eta - axis[:, None, 0], dphi, m], -1)
    return c * valid.unsqueeze(-1)


def from_centred(c, valid, axis):
    pt, m = c[..., 0], c[..., 3]
    eta = c[..., 1] + axis[:, None, 0]
    phi = c[..., 2] + axis[:, None, 1]
    p = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)
    e = torch.sqrt(m ** 2 + (pt * torch.cosh(eta)) ** 2)
    return torch.cat([p, e.unsqueeze(-1)], -1) * valid.unsqueeze(-1)


# --- the method: augmentations -------------------------------------------------------------------


def augment(p4, valid, axis, gen, rotate=True, translate=1.0, smear=0.1, split=0.5, smear_max=0.8):
    """One random view of a batch. p4 (B, N, 4), valid (B, N) -> (p4', valid').
    Order: measure the translation range, split, rotate, smear, translate (the public code
    rotates first; a rotation about the axis commutes with a collinear split). translate/smear/
    split = 0 turn an augmentation off. Random numbers come from `gen` (a CPU generator) and are
    moved to p4's device; padding slots stay zero unless a split particle is placed there.
    smear_max caps the smearing width (radians) at the jet radius: 0.1 GeV / pT exceeds it below
    125 MeV (soft fragments of a split), and an unbounded width sends eta to where cosh overflows."""
    B, N, _ = p4.shape
    dev = p4.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    c = to_centred(p4, valid, axis)  # (B, N, 4): pT, deta, dphi, m
    # translation range: peak-to-peak of the real particles, before anything moves them
    big = torch.finfo(c.dtype).max
    hi = torch.where(valid[..., None], c[..., 1:3], -big).amax(1)
    lo = torch.where(valid[..., None], c[..., 1:3], big).amin(1)
    extent = (hi - lo).clamp_min(0)  # (B, 2) in (eta, phi)
    if split > 0:
        # rank the real particles in a random order; the k-th chosen one goes to the k-th free slot
        u, z = rand(B, N), rand(B, N)
        key = torch.where(valid, u, 2.0)  # padding never chosen
        order = key.argsort(dim=1, stable=True)  # (B, N) slot of the particle with rank k
        k = torch.arange(N, device=dev).expand(B, N)
        chosen = (key.gather(1, order) < split) & (k < (~valid).sum(1, keepdim=True))  # per rank
        # free slots in slot order (valid slots sort after them): children fill the first ones,
        # so valid-first order (which trim_batch relies on) survives
        dest = (valid.long() * N + k).argsort(1)  # (B, N) k-th free slot
        zk = torch.where(chosen, z, 0.0)  # (B, N) fraction carried away by the child of rank k
        is_mom = torch.tensor([True, False, False, True], device=dev)  # pT and m scale, angles stay
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
        deta = deta + noise[0] * sigma
        dphi = dphi + noise[1] * sigma
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
    if axis is None:
        axis = jet_axis(p4, valid)
    c = to_centred(p4, valid, axis)
    one = torch.ones_like(c[..., 0])
    pt = torch.where(valid, c[..., 0], one)
    e = torch.where(valid, p4[..., 3], one).clamp_min(1e-6)
    j = (p4 * valid.unsqueeze(-1)).sum(1)  # (B, 4)
    jet_pt = torch.hypot(j[:, 0], j[:, 1]).clamp_min(1e-6)[:, None]
    jet_e = j[:, 3].clamp_min(1e-6)[:, None]
    # ParT's sign convention: deta flips sign for jets at negative eta
    deta = c[..., 1] * torch.where(axis[:, 0:1] < 0, -1.0, 1.0)
    dphi = c[..., 2]
    f = torch.stack([(pt.log() - 1.7) * 0.7, (e.log() - 2.0) * 0.7, ((pt / jet_pt).log() + 4.7) * 0.7,
                     ((e / jet_e).log() + 4.7) * 0.7, (torch.hypot(deta, dphi) - 0.2) * 4.0], -1)
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

    def forward(self, valid, p4, axis):
        h = self.encoder(valid, p4, axis)[2]  # (B, C)
        return h, self.head(h)


class LCTReadout(nn.Module):
    """Frozen readouts for the LCT in one pass: jet = [encoder output h, first head layer]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, valid, p4):
        h = self.model.encoder(valid, p4)[2]
        return None, None, torch.cat([h, self.model.head[1](self.model.head[0](h))], 1)


def nt_xent(z1, z2, temperature=0.1):
    """NT-Xent over 2B views: each view's positive is its partner, the other 2B-2 are negatives.
    Cosine similarities and the softmax in fp32. z1, z2 (B, D) -> scalar."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    B = len(z1)
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(sim, target)


def nt_xent_global(z, temperature=0.1):
    """z (2B, D) = [view 1; view 2] of this rank's B jets -> NT-Xent over the 2 x B x W views of
    all W ranks (SimCLR's global batch), the same value on every rank. The other ranks' views
    arrive detached: each rank back-propagates through its own views only, so DDP's average of
    the W gradients is 1/W of the global loss's gradient: backward (loss x W)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.detach().contiguous())
        parts[dist.get_rank()] = z
        B = len(z) // 2
        z = torch.cat([torch.cat([q[:B] for q in parts]), torch.cat([q[B:] for q in parts])])
    return nt_xent(*z.chunk(2), temperature)


# --- training -----------------------------------------------------------------------------------


def encoder_config(args):
    # pT-weighted pooling needs no class blocks (unused parameters would also stall DDP)
    cls_depth = args.cls_depth if args.pooling == "cls" else 0
    enc = common.EncoderConfig(in_dim=7, dim=args.dim, heads=args.heads, depth=args.depth,
                               cls_depth=cls_depth, pair_dim=(32, 32) if args.pair_bias else ())
    return dict(asdict(enc), pooling=args.pooling)  # flat: checkpoints store plain values


def two_views(p4, valid, gen, args):
    """Two independent views of each jet, stacked: (2B, T, 4), (2B, T), axis (2B, 2). The stream
    keeps all n_max slots (pad="n_max") for the splitting to fill; the particle axis is trimmed
    only now, after augmenting."""
    axis = jet_axis(p4, valid)
    kw = dict(rotate=args.rotate, translate=args.translate_width, smear=args.smear_gev,
              split=args.split_prob)
    a, va = augment(p4, valid, axis, gen, **kw)
    b, vb = augment(p4, valid, axis, gen, **kw)
    valid, p4 = common.trim_batch(torch.cat([va, vb]), torch.cat([a, b]))
    return valid, p4, torch.cat([axis, axis])


@torch.no_grad()
def val_loss(raw_model, stream, s, args):
    """Contrastive loss over every jet of `stream` (the last batch may be short: fewer
    negatives), averaged over views. The views come from a freshly seeded generator each time, so
    successive evaluations compare the same views (the public code let them drift)."""
    raw_model.eval()
    gen = common.generator(args.seed, "val-aug")
    total, n = 0.0, 0
    for batch in common.loader(stream, s.device):
        valid, p4, axis = two_views(batch["p4"], batch["valid"], gen, args)
        with s.ctx:
            z = raw_model(valid, p4, axis)[1]
        total += nt_xent(*z.chunk(2), args.nt_xent_temperature).item() * len(z)
        n += len(z)
    raw_model.train()
    return total / n


def lct(raw_model, cfg, s, args):
    """Linear classifier test: common.linear_probe on frozen, un-augmented readouts, fitted on a
    bounded sample of the train split and scored on --n-eval val jets."""
    n_fit = min(args.n_eval or 20000, args.n_jets or args.n_eval or 20000)
    kw = dict(path=args.data_dir, n_max=args.n_max, batch_size=args.batch_size, shuffle=False,
              drop_last=False, workers=args.workers, pad=PAD)
    readout, inputs = LCTReadout(raw_model), (lambda b: encoder_inputs(b, cfg))
    z_fit, y_fit = common.embed_stream(readout, common.JetStream(args.data, "train", n_jets=n_fit,
                                                                 **kw), s.device, s.ctx, inputs)
    z_val, y_val = common.embed_stream(readout, common.JetStream(args.data, "val", n_jets=args.n_eval,
                                                                 **kw), s.device, s.ctx, inputs)
    result, C = {}, cfg["dim"]
    for name, cols in (("repr", slice(0, C)), ("head1", slice(C, 2 * C))):
        m = common.linear_probe(z_fit[:, cols], y_fit, z_val[:, cols], y_val)
        result.update({f"lct_{name}_{k}": v for k, v in m.items() if k != "per_class"})
        print(f"LCT {name:5s} (logistic regression fitted on {len(y_fit)} train jets, scored on "
              f"{len(y_val)} val jets): acc {m['acc']:.4f} AUC {m['auc']:.4f} "
              f"1/eps_B(0.5) {m['rej50']:.1f}")
    return result


def train(args):
    s = common.setup(args)
    out = Path(args.out)
    # collinear splitting fills free slots: the training stream keeps all n_max of them
    train_stream = common.JetStream(
        args.data, "train", path=args.data_dir, n_jets=args.n_jets, n_max=args.n_max,
        batch_size=args.batch_size, seed=args.seed, rank=s.rank, world_size=s.world_size,
        shuffle_buffer=args.shuffle_buffer, workers=args.workers, transform=None, pad="n_max")
    cfg = encoder_config(args)
    raw_model = JetCLR(cfg, args.proj_dim).to(s.device)
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    start = common.resume_from(args.resume, raw_model, optimizer) if args.resume else 0
    model = common.wrap_model(raw_model, s)
    total = args.steps or args.epochs * len(train_stream)
    warmup = common.warmup_steps(args.warmup, total)
    eval_every = args.eval_every or len(train_stream)
    jets_per_step = args.batch_size * s.world_size
    logger = None
    if s.master:
        # the validation loss sees as many negatives as a training step: batches of B x W jets
        val_stream = common.JetStream(
            args.data, "val", path=args.data_dir, n_jets=args.n_eval, n_max=args.n_max,
            batch_size=jets_per_step, shuffle=False, drop_last=False, workers=args.workers,
            pad="n_max")
        n_params = sum(p.numel() for p in raw_model.encoder.parameters())
        print(f"jetclr: {args.data} {train_stream.n} train jets/epoch, {total} steps x "
              f"{jets_per_step} jets, encoder {n_params / 1e6:.2f}M params (dim {args.dim}, depth "
              f"{args.depth}, {args.pooling}), lr {args.lr:g}, {s.device}, git {common.git_hash()}; "
              f"full config in {out / 'jetclr.jsonl'}")
        logger = common.JsonlLogger(out / "jetclr.jsonl")
        logger.log(dict(config=vars(args), start_step=start, world_size=s.world_size,
                        git=common.git_hash(), versions=common.versions()))

    def save(step):
        common.save_checkpoint(out / "jetclr.pt", method="jetclr", args=args, model=raw_model,
                               encoder=raw_model.encoder, encoder_config=cfg, optimizer=optimizer,
                               step=step)

    bar = common.progress_bar(total, jets_per_step, start, s.master)
    result, t0 = dict(loss=float("nan")), time.time()
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
            z = model(valid, p4, axis)[1]  # (2B, proj_dim)
        loss = nt_xent_global(z, args.nt_xent_temperature)
        # 3. backward (x W: see nt_xent_global) + step
        optimizer.zero_grad(set_to_none=True)
        (loss * s.world_size).backward()
        common.check_finite(loss, step, f"{args.data} train")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        bar.update(jets_per_step)
        if (step + 1) % args.log_every == 0 and s.master:
            lossf = loss.item()
            bar.set_postfix(loss=f"{lossf:.4f}")
            bar.write(f"step {step + 1}/{total}: loss {lossf:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                      f"dt {dt * 1000:.1f} ms")
        if ((step + 1) % eval_every == 0 or step + 1 == total) and s.master:
            vl = val_loss(raw_model, val_stream, s, args)
            bar.write(f"step {step + 1}/{total} (epoch {epoch}): val loss {vl:.4f} "
                      f"over {val_stream.n} val jets")
            result = dict(step=step + 1, epoch=epoch, loss=loss.item(), val_loss=vl)
            logger.log(result)
            save(step + 1)
            t0 = time.time()  # the evaluation is not part of the next step's dt
    bar.close()
    if args.lct and s.master:
        result.update(lct(raw_model, cfg, s, args))
        logger.log(result)
    common.cleanup(s)
    return result


if __name__ == "__main__":
    train(get_args())
