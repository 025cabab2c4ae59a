"""JetCLR: contrastive pretraining of a jet encoder with physical augmentations.

Idea (Dillon et al., "Symmetries, safety and self-supervision", arXiv 2108.04253; scaling study
arXiv 2408.09343): two randomly augmented views of the same jet should map to nearby points on
the unit sphere, views of different jets to distant points. The augmentations encode the
symmetries a tagger should respect: rotation about the jet axis in (eta, phi), translation in
(eta, phi), soft smearing of (eta, phi) with width 0.1 GeV / pT (soft particles are poorly
measured), and collinear splitting of a particle into fractions z and 1-z at the same (eta, phi)
(IR/collinear safety). The loss is NT-Xent (InfoNCE over the 2B views of a batch, cosine
similarity, temperature 0.1). Quality is read off with the linear classifier test (LCT): a
logistic regression on frozen representations.

How this file does it: the augmentations act on whole batches of 4-vectors on the device, with
their own seeded torch.Generator (numbers drawn on the CPU, then moved, so CPU and GPU runs see
the same augmentations); the two views are augmented independently. The ParT "kin" features are
then recomputed from the augmented 4-vectors (a split particle gets a consistent log pT, log E,
dR), with (deta, dphi) measured from the un-augmented jet axis so that the translation is seen
by the network. The encoder is common.Encoder (pair bias off by default), pooled by class
attention or a pT-weighted sum, followed by a 2 x [ReLU, Linear] projection head.

Deviations from the paper / public code (bmdillon/JetCLR), and why:
- Encoder: the shared ParT-lite blocks instead of a 1000-wide transformer with 0.5 log pT added
  to the attention logits (the shared blocks take a ParT pair bias instead: --pair-bias).
- Inputs: 7 ParT "kin" features of up to --n-max particles instead of (pT, eta, phi) of 50.
- Collinear splitting: each real particle is split with probability --split-prob while free
  padding slots last (never beyond --n-max), instead of filling a jet up to 50 particles; it
  runs before the rotation (the two commute). The smearing width is capped at 0.8 (see augment).
- Bugs of the public code not repeated: padding is never smeared or counted in the translation
  range; no jet loses pT in the splitting; the LCT jets are never augmented; the LCT is trained
  on the validation split and scored on the test split; everything runs on a CPU.
- Optimiser: AdamW with warm-up and cosine decay (common's), lr 5e-4 for the small encoder.

GPU:  python jetclr.py --data pythia --data-dir data/pythia10 --epochs 100 --batch-size 256 --compile
CPU:  OMP_NUM_THREADS=1 python jetclr.py --n-jets 1000 --epochs 2 --dim 32 --depth 2 --n-eval 500
Add --profile to time data / augmentations / step separately, --scaling 500,1000,2000 for the
pretraining-size study (pretrain on each size, fine-tune each with finetune.py, table + PNG).
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# --- config -------------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(p)
    p.set_defaults(lr=5e-4, batch_size=256, n_eval=20000)
    g = p.add_argument_group("augmentations (each view drawn independently)")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=True,
                   help="rotate (deta, dphi) about the jet axis by an angle U[0, 2pi)")
    g.add_argument("--translate", action=argparse.BooleanOptionalAction, default=True,
                   help="shift all particles of a jet by one (deta, dphi)")
    g.add_argument("--translate-width", type=float, default=1.0,
                   help="shift drawn uniformly within +-width x the jet's half extent in eta and phi")
    g.add_argument("--smear", action=argparse.BooleanOptionalAction, default=True,
                   help="smear eta and phi of each particle by N(0,1) x smear-gev / pT")
    g.add_argument("--smear-gev", type=float, default=0.1, help="smearing strength in GeV")
    g.add_argument("--split", action=argparse.BooleanOptionalAction, default=True,
                   help="collinear splitting into z, 1-z (z ~ U(0,1)) filling padding slots")
    g.add_argument("--split-prob", type=float, default=0.5,
                   help="probability that a real particle is split, while free slots last")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, default=64, help="encoder width")
    g.add_argument("--heads", type=int, default=4, help="attention heads")
    g.add_argument("--depth", type=int, default=4, help="particle self-attention blocks")
    g.add_argument("--cls-depth", type=int, default=2, help="class-attention blocks (pooling cls)")
    g.add_argument("--pair-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="add ParT pair features as attention bias")
    g.add_argument("--pooling", choices=["cls", "ptsum"], default="cls",
                   help="jet representation: class-attention token or pT-weighted sum of tokens")
    g.add_argument("--proj-dim", type=int, default=64, help="projection head output size")
    g.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature")
    g = p.add_argument_group("evaluation and studies")
    g.add_argument("--lct", action=argparse.BooleanOptionalAction, default=True,
                   help="end of run: linear classifier test, trained on --n-eval validation jets "
                        "and scored on --n-eval test jets")
    g.add_argument("--profile", action="store_true",
                   help="time data, augmentation and step separately (synchronises the GPU)")
    g.add_argument("--scaling", type=str, default="",
                   help="comma-separated pretraining sizes: pretrain on each (same --epochs, so "
                        "smaller sets also get fewer steps), fine-tune each, table + PNG")
    g.add_argument("--scaling-labels", type=int, default=1000,
                   help="labelled training jets of each fine-tuning in --scaling (same jets for all)")
    g.add_argument("--scaling-finetune-epochs", type=int, default=20,
                   help="epochs of each fine-tuning in --scaling (warm-up: --warmup steps)")
    args = p.parse_args(argv)
    for name in ("translate_width", "smear_gev"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    if not 0.0 <= args.split_prob <= 1.0:
        raise SystemExit("--split-prob must be in [0, 1]")
    try:
        [int(n) for n in args.scaling.split(",") if args.scaling]
    except ValueError:
        raise SystemExit(f"--scaling {args.scaling}: give jet counts separated by commas, "
                         "e.g. 1000,10000")
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
    Order: split, rotate, smear, translate (the paper's code rotates first; a
    rotation about the axis commutes with a collinear split). translate/smear/split = 0 turn
    an augmentation off. Random numbers come from `gen` (a CPU generator) and are moved to p4's
    device; padding slots stay zero unless a split particle is placed there.
    smear_max caps the smearing width (radians) at the jet radius: 0.1 GeV / pT exceeds it below
    125 MeV (soft fragments of a split), and an unbounded width sends eta to where cosh overflows."""
    B, N, _ = p4.shape
    dev = p4.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    c = to_centred(p4, valid, axis)  # (B, N, 4): pT, deta, dphi, m
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
        # half the jet's extent, real particles only (the public code let padding at 0 widen it)
        big = torch.finfo(deta.dtype).max
        def half_extent(x):
            hi = torch.where(valid, x, torch.full_like(x, -big)).amax(1)
            lo = torch.where(valid, x, torch.full_like(x, big)).amin(1)
            return ((hi - lo) / 2).clamp_min(0).unsqueeze(1)
        shift = translate * (2 * rand(2, B, 1) - 1)
        deta = deta + shift[0] * half_extent(deta)
        dphi = dphi + shift[1] * half_extent(dphi)
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
            pt = torch.hypot(p4[:, : tokens.shape[1], 0], p4[:, : tokens.shape[1], 1]) * tok_valid
            w = pt / pt.sum(1, keepdim=True).clamp_min(1e-6)  # (B, T)
            jet = torch.einsum("bt,btc->bc", w.to(tokens.dtype), tokens)
        return tokens, tok_valid, jet


def build_encoder(cfg):
    return JetCLREncoder(cfg)


def encoder_inputs(jets, cfg):
    return dict(valid=jets.valid, p4=jets.p4)


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


def nt_xent(z1, z2, temperature=0.1):
    """NT-Xent over 2B views: each view's positive is its partner, the other 2B-2 are negatives.
    Cosine similarities and the softmax in fp32. z1, z2 (B, D) -> scalar."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    B = len(z1)
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(sim, target)


# --- training -----------------------------------------------------------------------------------


def encoder_config(args):
    # pT-weighted pooling needs no class blocks (unused parameters would also stall DDP)
    cls_depth = args.cls_depth if args.pooling == "cls" else 0
    enc = common.EncoderConfig(in_dim=7, dim=args.dim, heads=args.heads, depth=args.depth,
                               cls_depth=cls_depth, pair_dim=(32, 32) if args.pair_bias else ())
    return dict(asdict(enc), pooling=args.pooling)  # flat: checkpoints store plain values


def two_views(p4, valid, gen, args):
    """Two independent views of each jet, stacked: (2B, T, 4), (2B, T), axis (2B, 2). The particle
    axis is trimmed only now, after the splitting has filled padding slots."""
    axis = jet_axis(p4, valid)
    kw = dict(rotate=args.rotate, translate=args.translate_width if args.translate else 0.0,
              smear=args.smear_gev if args.smear else 0.0,
              split=args.split_prob if args.split else 0.0)
    a, va = augment(p4, valid, axis, gen, **kw)
    b, vb = augment(p4, valid, axis, gen, **kw)
    valid, p4 = common.trim_batch(torch.cat([va, vb]), torch.cat([a, b]))
    return valid, p4, torch.cat([axis, axis])


@torch.no_grad()
def val_loss(raw_model, jets, args, s):
    """Contrastive loss on validation jets, with views from a freshly seeded generator each time,
    so successive evaluations compare the same views (the public code let them drift)."""
    raw_model.eval()
    gen = torch.Generator().manual_seed(args.seed + 10_000)
    total, n = 0.0, 0
    for batch in common.epoch_batches(dict(p4=jets.p4, real=jets.valid), args.batch_size, s.device,
                                      shuffle=False, drop_last=True, trim=()):
        valid, p4, axis = two_views(batch["p4"], batch["real"], gen, args)
        with s.ctx:
            z = raw_model(valid, p4, axis)[1]
        total += nt_xent(z[: len(z) // 2], z[len(z) // 2:], args.temperature).item()
        n += 1
    raw_model.train()
    return total / max(n, 1)


@torch.no_grad()
def representations(raw_model, jets, s, batch_size=512):
    """Frozen, un-augmented representations: encoder output h (N, C) and first head layer (N, C)."""
    raw_model.eval()
    hs, gs = [], []
    for batch in common.epoch_batches(dict(p4=jets.p4, valid=jets.valid), batch_size, s.device,
                                      shuffle=False, drop_last=False, trim=("p4",)):
        with s.ctx:
            h = raw_model.encoder(batch["valid"], batch["p4"])[2]
            g = raw_model.head[1](raw_model.head[0](h))
        hs.append(h.float().cpu())
        gs.append(g.float().cpu())
    raw_model.train()
    return torch.cat(hs), torch.cat(gs)


def train(args):
    if args.scaling:
        return scaling_study(args)
    s = common.setup(args)
    out = Path(args.out)
    jets = common.load_jets(args.data, args.data_dir, "train", n_jets=args.n_jets, n_max=args.n_max)
    val = common.load_jets(args.data, args.data_dir, "val", n_jets=args.n_eval, n_max=args.n_max)
    cfg = encoder_config(args)
    raw_model = JetCLR(cfg, args.proj_dim).to(s.device)
    optimizer = common.configure_optimizer(raw_model, args.lr, args.weight_decay,
                                           device_type=s.device_type)
    aug_gen = torch.Generator().manual_seed(args.seed + 1 + s.rank)  # augmentations only
    start = 0
    if args.resume:
        start = common.resume_from(args.resume, raw_model, optimizer, {"aug": aug_gen})
    model = common.wrap_model(raw_model, s)
    per_epoch = common.steps_per_epoch(len(jets), args.batch_size, s.world_size)
    total = per_epoch * args.epochs
    eval_every = args.eval_every or per_epoch
    n_params = sum(p.numel() for p in raw_model.encoder.parameters())
    if s.master:
        print(f"jetclr: {len(jets)} train jets, {n_params / 1e6:.2f}M encoder parameters, "
              f"{total} steps on {s.device}; config {vars(args)}; git {common.git_hash()}")
    logger = common.JsonlLogger(out / "jetclr.jsonl") if s.master else None
    sync = torch.cuda.synchronize if s.device_type == "cuda" else (lambda: None)
    timer = dict(data=0.0, aug=0.0, step=0.0)
    t_first, n_timed, step, loss = None, 0, start, torch.tensor(float("nan"))  # nan: no step taken

    def save(step):
        common.save_checkpoint(out / "jetclr.pt", method="jetclr", args=args, model=raw_model,
                               encoder=raw_model.encoder, encoder_config=cfg, optimizer=optimizer,
                               step=step, generators={"aug": aug_gen})

    # the batch key is "real", not "valid", so that the loader does not trim away the padding
    # slots that the collinear splitting fills; two_views trims after augmenting
    batches = common.train_batches(dict(p4=jets.p4, real=jets.valid), args.batch_size, s.device,
                                   args.epochs, seed=args.seed, start_step=start, rank=s.rank,
                                   world_size=s.world_size, trim=())
    t0 = time.perf_counter()
    for step, epoch, batch in batches:
        if args.profile:
            sync()
            t1 = time.perf_counter()
            timer["data"] += t1 - t0
        common.set_lr(optimizer, common.lr_at(step, total, args.warmup, args.lr))
        with torch.no_grad():
            valid, p4, axis = two_views(batch["p4"], batch["real"], aug_gen, args)
        if args.profile:
            sync()
            t2 = time.perf_counter()
            timer["aug"] += t2 - t1
        with s.ctx:
            z = model(valid, p4, axis)[1]  # (2B, proj_dim)
        loss = nt_xent(z[: len(z) // 2], z[len(z) // 2:], args.temperature)  # fp32 inside
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        if args.profile:
            sync()
            timer["step"] += time.perf_counter() - t2
        if t_first is None:  # the first step pays for compilation and allocation: not timed
            sync()
            t_first, n_timed = time.perf_counter(), 0
        else:
            n_timed += 1
        if (step + 1) % eval_every == 0 or step + 1 == total:
            sync()
            elapsed = time.perf_counter() - t_first
            rate = n_timed * args.batch_size * s.world_size / max(elapsed, 1e-9)
            vl = val_loss(raw_model, val, args, s) if s.master else float("nan")
            if s.master:
                print(f"step {step + 1}/{total} epoch {epoch} loss {loss.item():.4f} "
                      f"val {vl:.4f} lr {optimizer.param_groups[0]['lr']:.2e} {rate:.0f} jets/s")
                logger.log(dict(step=step + 1, epoch=epoch, loss=loss.item(), val_loss=vl,
                                jets_per_s=rate))
                save(step + 1)
            t_first, n_timed = time.perf_counter(), 0  # do not count the evaluation
        t0 = time.perf_counter()
    result = dict(loss=loss.item(), steps=total)
    if args.profile and total > start:
        n = total - start
        ms = {k: 1e3 * v / n for k, v in timer.items()}
        result.update({f"ms_{k}": v for k, v in ms.items()})
        if s.master:
            print("per step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f"; augmentations are {100 * ms['aug'] / sum(ms.values()):.1f}% of the time")
    if args.lct and s.master:
        test = common.load_jets(args.data, args.data_dir, "test", n_jets=args.n_eval,
                                n_max=args.n_max)
        h_val, g_val = representations(raw_model, val, s)
        h_test, g_test = representations(raw_model, test, s)
        for name, zf, zs in (("repr", h_val, h_test), ("head1", g_val, g_test)):
            m = common.linear_probe(zf, val.y, zs, test.y)
            result.update({f"lct_{name}_{k}": v for k, v in m.items() if k != "per_class"})
            print(f"LCT {name:5s} (fit on {len(val)} val jets, scored on {len(test)} test jets): "
                  f"acc {m['acc']:.4f} AUC {m['auc']:.4f} 1/eps_B(0.5) {m['rej50']:.1f}")
        logger.log(result)
    common.cleanup(s)
    return result


def scaling_study(args):
    """Pretraining-size scaling: for each size N in --scaling, pretrain on N jets and fine-tune the
    encoder on the same --scaling-labels labelled jets (finetune.py, one seed); N = 0 is the same
    architecture from random weights. Prints a table and saves <out>/jetclr_scaling.png."""
    out = Path(args.out)
    sizes = [int(n) for n in args.scaling.split(",")]

    def finetune_mean(ckpt, name, scratch=False):
        # finetune.py is run as a program, not imported: method scripts import only common.py
        argv = ["--ckpt", str(ckpt), "--mode", "finetune", "--head", "linear",
                "--n-labels", str(args.scaling_labels), "--epochs", str(args.scaling_finetune_epochs),
                "--data", args.data, "--batch-size", str(args.batch_size), "--device", args.device,
                "--seed", str(args.seed), "--n-max", str(args.n_max), "--warmup", str(args.warmup),
                "--out", str(out / "scaling_finetune"), "--name", name] + ["--scratch"] * scratch
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--n-eval", str(args.n_eval)] if args.n_eval else []
        script = Path(__file__).resolve().parent / "finetune.py"
        subprocess.run([sys.executable, str(script), *argv], check=True)
        results = json.loads((out / "scaling_finetune" / name / "results.json").read_text())
        return results["mean"]

    rows = []
    for n in sizes:
        run = copy.copy(args)
        run.scaling, run.n_jets, run.out = "", n, str(out / f"scaling_n{n}")
        pre = train(run)
        ft = finetune_mean(Path(run.out) / "jetclr.pt", f"n{n}")
        rows.append(dict(n=n, lct_auc=pre.get("lct_repr_auc", float("nan")),
                         lct_rej50=pre.get("lct_repr_rej50", float("nan")),
                         ft_auc=ft["auc"], ft_rej50=ft["rej50"]))
    # the same architecture from random weights, fine-tuned on the same labelled jets
    ft = finetune_mean(out / f"scaling_n{sizes[0]}" / "jetclr.pt", "scratch", scratch=True)
    rows.insert(0, dict(n=0, lct_auc=float("nan"), lct_rej50=float("nan"), ft_auc=ft["auc"],
                        ft_rej50=ft["rej50"]))
    print(f"\npretraining jets | LCT AUC | LCT 1/eps_B(0.5) | fine-tuned "
          f"({args.scaling_labels} labels) AUC | fine-tuned 1/eps_B(0.5)")
    for r in rows:
        name = "0 (scratch)" if r["n"] == 0 else str(r["n"])
        print(f"{name:>16s} | {r['lct_auc']:.4f} | {r['lct_rej50']:7.1f} | {r['ft_auc']:.4f} | "
              f"{r['ft_rej50']:7.1f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    pre = rows[1:]
    ax.plot([r["n"] for r in pre], [r["ft_rej50"] for r in pre], "o-", label="fine-tuned")
    ax.plot([r["n"] for r in pre], [r["lct_rej50"] for r in pre], "s--", label="LCT (frozen)")
    ax.axhline(rows[0]["ft_rej50"], color="gray", ls=":", label="from scratch")
    ax.set(xscale="log", xlabel="pretraining jets", ylabel="1/eps_B at eps_S = 0.5",
           title=f"JetCLR, fine-tuned on {args.scaling_labels} labelled jets")
    ax.legend()
    fig.tight_layout()
    path = out / "jetclr_scaling.png"
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return dict(rows=rows)


if __name__ == "__main__":
    train(get_args())
