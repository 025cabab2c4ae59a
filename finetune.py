"""finetune.py: measure what a pretrained jet encoder is worth on labelled jets.

Loads the encoder of any method's checkpoint (rebuilt by that method's `build_encoder` from the
config stored in it), puts a small head on top and trains it on labelled training jets:
  --mode probe      the encoder is frozen (eval mode, no gradients): only the head learns.
  --mode finetune   everything learns; with --schedule frozen-then-unfrozen the backbone is
                    frozen for --freeze-steps, then joins at lr 1e-8 ramping linearly to the
                    head's lr over --ramp-steps (MPM v2, arXiv 2409.12589).
  --scratch         the same architecture from random weights: the supervised baseline. Without
                    --ckpt it is the shared ParT-lite encoder of --size (small or part).
Heads: linear / mlp on the encoder's jet vector, mean (average of the valid tokens + linear),
flatten (all token slots + linear), cls-attn (two class-attention blocks reading the tokens).
linear and mlp read the jet vector through a BatchNorm without affine parameters (as MAE's
linear probe, arXiv 2111.06377): a pretrained encoder's vectors can share one large common
direction (diffmae's pooled cosine is 0.995), and a head fed them raw needs far more than the 20
steps of 10% labels to find the small differences, while the encoder's first updates move them.
Its evaluation statistics are recomputed before every validation and the test ("precise BN"):
the biased mean and variance of up to PRECISE_BN_JETS training jets' vectors, encoder in eval
mode. Running averages lagged the encoder: after 3 steps they shifted every logit alike, and
accuracy fell to 0.5 while AUC held. Scratch encoders get the same head.
--backbone-lr-scale s gives the backbone s x the head's lr (both arms alike), under either
schedule. The default (1, constant) was chosen on validation: a small MPM (width 32, 200 steps
on 4,000 generated ten-class jets), 1,000 labels of generated top/QCD with MPI, 60 steps at
batch 64, 3 seeds, best validation AUC: scale 1 0.9365 +- 0.0046; scale 0.1 0.9013 +- 0.0081
(best at the last validation: too slow for the budget); frozen-then-unfrozen (15 + 15 steps)
0.9267 +- 0.0055; scratch at scale 1 0.9421 +- 0.0064 (so this encoder had little to protect).
--task cwola trains on two mixed samples labelled only by sample (pure QCD vs QCD plus a
fraction --signal-frac of signal; CWoLa, arXiv 1708.02949) and is scored on the true labels.

Data (every split goes through common.JetStream; no split is ever held whole):
- labelled training jets: --n-labels N, or --label-frac f of the training jets (counted from the
  files' metadata, after --n-jets). Up to MAX_IN_MEMORY labels are drawn for each seed from a
  pool of 10 N jets (at most MAX_IN_MEMORY) held in memory, stratified: every --seeds run trains
  on its own subset. Larger label sets stream from the files: the first N / n_files jets of every
  class file, the same jets for every seed (only the order and the initial weights change).
  CWoLa's two mixtures are built in memory (at most MAX_IN_MEMORY jets per split).
- validation and test stream from the files, every jet in order (--n-eval caps them).
- --min-subjets N keeps only jets with >= N non-empty C/A R=0.2 subjets (J-JEPA's evaluation
  selection), clustered in the loader workers: the other jets weigh 0 in the loss and are left
  out of every metric and of test_repr.npz (what they hold cannot change a number: no jet sees
  another in the encoder or the head). --n-labels counts jets before the selection.
Budget by steps (issue 19): max(--epochs x steps per epoch, --min-steps) optimizer steps, so
100 labels train as long as 1,000 (--steps N: exactly N); the printed line "seed S: N optimizer
steps" says how many. In-memory labels make equal batches that use every labelled jet once per
epoch: the last batch is filled with jets drawn once per seed (streamed labels drop the last
partial batch of each epoch). About 20 validations per run (or every --eval-every steps); the
test uses the weights of the best validation (AUC; accuracy for multi-class), and only gives
the reported numbers: accuracy, AUC, background rejection 1/eps_B at eps_S = 0.5 and 0.3 and
sic, the best eps_S/sqrt(eps_B) over thresholds that >= 10 background jets pass (multi-class:
one-vs-QCD means), mean +- std over --seeds runs (population std, ddof 0; study.md gives
the sample std). A run "converged" when its best validation came before the last quarter of
its steps.

Writes, under <out>/<name>/: log.jsonl (one line per validation), roc.png (every seed),
test_repr.npz (z: the encoder's jet vectors (N, C) of N_REPR selected test jets drawn at random,
first seed, the chosen weights; y: their labels) and, last, results.json:
  name, method, ckpt, task, classes (names, label k = classes[k]), n_labels (labelled jets
  asked for), labels ("memory": a subset per seed | "stream": the same for every seed), n_train
  (training jets per epoch), n_val, n_test (jets scored, after --min-subjets), steps, warmup,
  seeds, args, git, versions;
  per_seed: [{acc, auc, rej50, rej30, sic (multi-class also auc_<class>, rej50_<class>, ...)}],
  mean / std: the same keys over seeds; a value that is infinite or undefined on the test set
  (1/eps_B when no background jet passes, the std beside it) is null;
  history: per seed, [{epoch, step, val_acc, val_auc, train_loss}] one per validation (epoch =
  steps / steps per epoch);
  steps_to_converge: per seed, the step of the best validation (the weights tested);
  converged: per seed, whether that step came before the last quarter of the run.
A loss that goes NaN/inf stops the run (naming the step and the batch's file) with a non-zero
exit, and nothing is written.

    python finetune.py --ckpt out/mpm.pt --mode probe --head linear
    python finetune.py --ckpt out/mpm.pt --mode finetune --head cls-attn --label-frac 0.1 --seeds 3
    python finetune.py --scratch --size part --mode finetune --data toptagging --seeds 3
    python finetune.py --ckpt out/jjepa.pt --min-subjets 10 --head mean
    python finetune.py --ckpt out/mpm.pt --task cwola --signal-frac 0.05 --n-labels 20000
Tiny CPU run: python finetune.py --scratch --mode finetune --n-jets 1000 --min-steps 20 \
    --device cpu
"""
import argparse
import copy
import dataclasses
import functools
import math
import os
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import diffmae
import jetclr
import jjepa
import mpm

# checkpoints this file reads: method -> the script defining build_encoder(cfg),
# encoder_inputs(batch, cfg) and batch_transform(cfg); the shared encoder's pair is below
METHODS = {"jjepa": jjepa, "jetclr": jetclr, "mpm": mpm, "diffmae": diffmae}
SHARED = ("part", "scratch", "supervised")
KIN_ONLY = ("toptagging",)  # data without particle ID and impact parameters: "full" is refused
MAX_IN_MEMORY = 20_000  # labelled jets held in memory (~115 MB at --n-max 128, "kin"); more stream
N_REPR = 5000           # test jets whose encoder vectors go to test_repr.npz
PRECISE_BN_JETS = 4096  # training jets whose vectors set the head's BatchNorm statistics

# --- config -----------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--ckpt", default=None,
                   help="checkpoint written by a pretraining script (its method and encoder "
                        "config rebuild the encoder)")
    g.add_argument("--scratch", action="store_true",
                   help="random initialisation instead of the checkpoint's weights (the "
                        "checkpoint's architecture, or --size without --ckpt)")
    g.add_argument("--size", choices=sorted(common.ENCODER_PRESETS), default="small",
                   help="ParT-lite encoder size for --scratch without --ckpt (part = ParT's size)")
    g.add_argument("--features", choices=["kin", "full"], default=None,
                   help="particle features (None: the checkpoint's; kin for --scratch)")
    g = p.add_argument_group("how")
    g.add_argument("--mode", choices=["probe", "finetune"], default="probe",
                   help="probe: frozen encoder, only the head trains; finetune: all weights train")
    g.add_argument("--head", choices=["linear", "mlp", "cls-attn", "flatten", "mean"],
                   default="linear",
                   help="linear/mlp: on the jet vector; "
                        "mean: average of the valid tokens + linear; "
                        "flatten: all token slots + linear; cls-attn: 2 class-attention blocks")
    g.add_argument("--head-hidden", type=common.positive_int, default=128,
                   help="hidden width of the mlp head")
    labels = g.add_mutually_exclusive_group()
    labels.add_argument("--label-frac", type=common.fraction, default=1.0,
                        help="fraction of the training jets whose labels are used (stratified)")
    labels.add_argument("--n-labels", type=common.positive_int, default=None,
                        help="number of labelled training jets (stratified), "
                             "instead of a fraction")
    g.add_argument("--seeds", type=common.positive_int, default=1,
                   help="independent runs (seed, seed+1, ...): "
                        "label subset, head init, data order")
    g.add_argument("--label-smoothing", default=0.0,
                   type=common.number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   help="cross-entropy label smoothing (MPM v2 used 0.1)")
    g.add_argument("--schedule", choices=["constant", "frozen-then-unfrozen"], default="constant",
                   help="finetune: train the backbone from the start, or freeze it first")
    g.add_argument("--freeze-steps", type=common.nonneg_int, default=100,
                   help="frozen-then-unfrozen: steps with the backbone frozen (MPM v2: 5000, or "
                        "100 for <= 1000 jets)")
    g.add_argument("--ramp-steps", type=common.nonneg_int, default=100,
                   help="frozen-then-unfrozen: steps over which the backbone lr ramps from 1e-8 "
                        "to the head's")
    g.add_argument("--backbone-lr-scale", type=common.unit, default=1.0,
                   help="finetune: the backbone's lr is this fraction of the head's, under either "
                        "--schedule (a pretrained backbone is not wiped out by the first "
                        "gradients of a random head); scratch runs get the same")
    g.add_argument("--min-steps", type=common.nonneg_int, default=500,
                   help="at least this many optimizer steps (steps = max(--epochs x steps per "
                        "epoch, --min-steps)), so that 100 labels train as long as 1,000")
    g.add_argument("--eval-every", type=common.nonneg_int, default=0,
                   help="validate every this many steps (0: about 20 times per run); the test "
                        "uses the weights of the best validation")
    g.add_argument("--n-val", type=common.positive_int, default=None,
                   help="validation jets (None: --n-eval); they are scored about 20 times per "
                        "run, the test jets once")
    g.add_argument("--optimizer", choices=["adamw", "schedulefree"], default="adamw",
                   help="AdamW with a cosine lr, or schedule-free AdamW (betas 0.9/0.95, constant "
                        "lr after the warm-up; evaluated at its averaged weights)")
    g.add_argument("--task", choices=["supervised", "cwola"], default="supervised",
                   help="cwola: learn from two mixed samples labelled by sample only")
    g.add_argument("--signal-frac", type=common.unit, default=None,
                   help="cwola: fraction of signal jets in the second mixed sample")
    g.add_argument("--min-subjets", default=0,
                   type=common.number_type(int, lambda v: 0 <= v <= 20, "an integer in [0, 20]"),
                   help="use only jets with at least this many non-empty C/A R=0.2 subjets of "
                        "their --n-max particles (J-JEPA evaluates on >= 10); 0: every jet")
    g.add_argument("--name", default=None,
                   help="results folder under --out (None: built from method, mode, head, labels)")
    common.add_common_args(p, skip=("resume", "eval-every"))
    p.set_defaults(epochs=20, batch_size=256, lr=1e-3, weight_decay=0.01, log_every=50)
    args = p.parse_args(argv)
    if args.ckpt is None and not args.scratch:
        p.error("give --ckpt (a pretrained encoder) or --scratch (random init of --size)")
    if args.task == "cwola" and args.signal_frac is None:
        p.error("--task cwola needs --signal-frac S (fraction of signal in the mixed sample)")
    if args.task != "cwola" and args.signal_frac is not None:
        p.error("--signal-frac is used only with --task cwola")
    if args.schedule != "constant" and args.mode != "finetune":
        p.error("--schedule frozen-then-unfrozen needs --mode finetune")
    return args


# --- labels: subsets and CWoLa mixtures -------------------------------------------------------


def label_subset(y, n, rng):
    """Indices of n training jets with the class proportions of y (stratified), at least one
    per class."""
    if n >= len(y):
        return np.arange(len(y))
    picks = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = max(1, round(n * len(members) / len(y)))
        picks.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(picks))


def cwola_mixture(y, signal_frac, rng):
    """CWoLa's two samples of equal size from jets with true labels y (0 = QCD, 1 = signal):
    sample 0 = pure QCD, sample 1 = QCD with a fraction signal_frac of signal. Returns the jets'
    indices and their sample labels; the true labels are never used beyond building them."""
    bkg = rng.permutation(np.flatnonzero(y == 0))
    sig = rng.permutation(np.flatnonzero(y == 1))
    half = len(bkg) // 2
    n_sig = round(signal_frac * half)
    if n_sig > len(sig):
        raise SystemExit(f"--signal-frac {signal_frac}: the mixed sample needs {n_sig} signal "
                         f"jets but the split has {len(sig)}; lower --signal-frac")
    idx = np.concatenate([bkg[:half], bkg[half:2 * half - n_sig], sig[:n_sig]])
    return idx, np.repeat([0, 1], half)


# --- the classifier: encoder + head -----------------------------------------------------------


class Classifier(nn.Module):
    """encoder(**inputs) -> (tokens (B, N, C), valid (B, N), jet (B, C)) -> head -> logits (B, K).
    forward returns (logits, jet): the jet vector is what test_repr.npz keeps."""

    def __init__(self, encoder, head, n_classes, dim_tokens, dim_jet, n_tokens, hidden=128):
        super().__init__()
        self.encoder = encoder
        self.kind = head
        self.n_tokens = n_tokens
        # linear / mlp: the jet vector is batch-normalised first, without affine parameters; the
        # statistics used at evaluation are set by precise_bn before every evaluation
        norm = nn.BatchNorm1d(dim_jet, affine=False)
        if head == "linear":
            self.head = nn.Sequential(norm, nn.Linear(dim_jet, n_classes))
        elif head == "mlp":
            self.head = nn.Sequential(norm, nn.Linear(dim_jet, hidden), nn.GELU(),
                                      nn.Linear(hidden, n_classes))
        elif head == "mean":
            self.head = nn.Linear(dim_tokens, n_classes)
        elif head == "flatten":  # one weight per token slot: batches keep every slot (pad n_max)
            self.head = nn.Linear(n_tokens * dim_tokens, n_classes)
        elif head == "cls-attn":  # ParT's class attention, as the MPM v2 fine-tuning head
            heads = next(h for h in (8, 4, 2, 1) if dim_tokens % h == 0)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim_tokens))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.blocks = nn.ModuleList(common.ClassBlock(dim_tokens, heads) for _ in range(2))
            self.norm = nn.LayerNorm(dim_tokens)
            self.head = nn.Linear(dim_tokens, n_classes)
        else:
            raise ValueError(f"unknown head {head!r}")

    def forward(self, inputs, backbone_grad=True):
        # a frozen backbone runs without autograd: no activations kept, no gradient can leak
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone_grad):
            tokens, valid, jet = self.encoder(**inputs)
        if self.kind in ("linear", "mlp"):
            return self.head(jet), jet
        tokens = tokens * valid[..., None]                                       # (B, N, C)
        if self.kind == "mean":
            pooled = tokens.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)     # (B, C)
            return self.head(pooled), jet
        if self.kind == "flatten":
            tokens = F.pad(tokens, (0, 0, 0, self.n_tokens - tokens.shape[1]))   # (B, S, C)
            return self.head(tokens.flatten(1)), jet
        B = tokens.shape[0]
        bias = common.attention_bias(torch.cat([valid.new_ones(B, 1), valid], 1), None,
                                     tokens.dtype)                               # (B, 1, 1, 1+N)
        cls = self.cls_token.expand(B, -1, -1)                                   # (B, 1, C)
        for block in self.blocks:
            cls = block(cls, tokens, bias)
        return self.head(self.norm(cls[:, 0])), jet


def set_frozen(encoder, frozen):
    """Frozen: eval mode (no dropout) and no gradients; otherwise trainable."""
    encoder.train(not frozen)
    encoder.requires_grad_(not frozen)


def backbone_lr(step, head_lr, args):
    """--backbone-lr-scale x the head's lr; frozen-then-unfrozen (MPM v2): 0 while frozen, then
    from 1e-8 linearly up to that."""
    if args.mode == "probe":
        return 0.0
    top = args.backbone_lr_scale * head_lr
    if args.schedule == "constant":
        return top
    if step < args.freeze_steps:
        return 0.0
    ramp = min(1.0, (step - args.freeze_steps) / max(1, args.ramp_steps))
    return 1e-8 + ramp * (top - 1e-8)


def selected_loss(logits, label, keep, smoothing):
    """Cross-entropy averaged over the selected jets (--min-subjets); the others weigh 0."""
    ce = F.cross_entropy(logits.float(), label, label_smoothing=smoothing, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp(min=1)


def converged(best_step, total):
    """Issue 19's rule: a run converged when its best validation came before the last quarter
    of its steps; later, more steps might still have helped."""
    return best_step <= 0.75 * total


@torch.no_grad()
def precise_bn(raw_model, stream, s, inputs):
    """Set the linear/mlp head's BatchNorm statistics to the biased mean and variance of the
    training jets' vectors under the encoder as it is now, in eval mode ("precise BN").
    Running averages would lag the encoder: after 3 steps from mean 0 and variance 1 they hold
    an offset that shifts every logit alike, and accuracy collapses while AUC holds."""
    if raw_model.kind not in ("linear", "mlp"):
        return
    training = raw_model.training
    raw_model.eval()
    zs = []
    for batch in common.loader(stream, s.device):
        with s.ctx:
            jet = raw_model.encoder(**inputs(batch))[2]
        zs.append(jet.double()[batch["keep"]])
    raw_model.train(training)
    z = torch.cat(zs)                                                        # (N, C)
    if len(z) == 0:  # --min-subjets left no training jet of this pass: keep what it has
        return
    norm = raw_model.head[0]
    norm.running_mean.copy_(z.mean(0))
    norm.running_var.copy_(z.var(0, unbiased=False))


# --- data -------------------------------------------------------------------------------------


def prepare_batch(batch, classes, min_subjets, encoder_transform, subjets=jjepa.SUBJETS):
    """Per-batch work in the loader workers (picklable as a functools.partial): `label` 0..K-1
    from the jet's class (-1: a class the training jets lack; in-memory sets bring their own),
    `keep` = the --min-subjets selection (C/A with the settings `subjets`), then what the
    encoder's own inputs need."""
    if "label" not in batch:
        at = np.searchsorted(classes, batch["y"]).clip(max=len(classes) - 1)
        batch["label"] = np.where(np.asarray(classes)[at] == batch["y"], at, -1)
    batch["keep"] = np.ones(len(batch["y"]), dtype=bool)
    if min_subjets:
        sub = common.cluster_subjets(batch["p4"], batch["valid"], "ca", subjets["subjet_r"],
                                     subjets["n_subjets"], subjets["n_per_subjet"])
        batch["keep"] = sub.valid.any(-1).sum(-1) >= min_subjets                 # (B,)
    return encoder_transform(batch) if encoder_transform is not None else batch


def build_encoder(cfg):
    """The shared ParT-lite encoder from its config dict (a checkpoint's `encoder_config`)."""
    return common.Encoder(common.EncoderConfig(**cfg))


def encoder_inputs(batch, cfg=None):
    """Its forward arguments from a stream batch (dict of tensors on the device)."""
    return dict(x=batch["x"], valid=batch["valid"], p4=batch["p4"])


# the shared encoder ("part", "scratch", "supervised") behind the same interface as a method
# module; its inputs need no worker transform
SHARED_ENCODER = types.SimpleNamespace(build_encoder=build_encoder, encoder_inputs=encoder_inputs)


def load_spec(args):
    """Which encoder to build: method, its module, config dict, weights (None = random) and
    features."""
    if args.ckpt is None:
        cfg = dataclasses.asdict(common.ENCODER_PRESETS[args.size])
        features = args.features or "kin"
        cfg["in_dim"] = len(common.FEATURE_NAMES[features])
        method = "part"
        state = None
    else:
        ckpt = common.load_checkpoint(args.ckpt)
        if ckpt.get("encoder") is None:
            raise SystemExit(f"{args.ckpt}: the checkpoint holds no encoder weights")
        cfg = ckpt["encoder_config"]
        stored = ckpt["args"]
        method = ckpt["method"]
        by_width = {len(v): k for k, v in common.FEATURE_NAMES.items()}
        features = (args.features or stored.get("features")
                    or by_width.get(cfg.get("in_dim"), "kin"))
        if "in_dim" in cfg and cfg["in_dim"] != len(common.FEATURE_NAMES[features]):
            raise SystemExit(f"--features {features} gives {len(common.FEATURE_NAMES[features])} "
                             f"inputs but {args.ckpt} was trained on {cfg['in_dim']}")
        state = None if args.scratch else ckpt["encoder"]
    if features != "kin" and args.data in KIN_ONLY:
        raise SystemExit(f"{args.ckpt or '--scratch'}: uses --features {features}, but --data "
                         f"{args.data} has no particle ID or impact parameters; pretrain (or "
                         "run) with --features kin")
    if method not in SHARED and method not in METHODS:
        raise SystemExit(f"{args.ckpt}: method {method!r} is not one finetune.py knows "
                         f"({', '.join(sorted(METHODS))}, or the shared encoder)")
    module = SHARED_ENCODER if method in SHARED else METHODS[method]
    # --min-subjets clusters as the J-JEPA checkpoint did, else as the paper (jjepa's defaults)
    subjets = {k: cfg.get(k, v) if method == "jjepa" else v for k, v in jjepa.SUBJETS.items()}
    transform = None if module is SHARED_ENCODER else module.batch_transform(cfg)
    return dict(method=method, module=module, cfg=cfg, state=state, features=features,
                min_subjets=args.min_subjets, subjets=subjets, encoder_transform=transform)


def make_stream(args, spec, data, split="train", **kw):
    """A JetStream over `data` (a source name, or Jets in memory) with this run's batch form."""
    memory = isinstance(data, common.Jets)
    kw = dict(dict(path=args.data_dir, n_max=data.valid.shape[1] if memory else args.n_max,
                   features=spec["features"], batch_size=args.batch_size, workers=args.workers,
                   shuffle_buffer=args.shuffle_buffer, transform=spec.get("transform"),
                   pad="n_max" if args.head == "flatten" else "batch"), **kw)
    return common.JetStream(data, split, **kw)


def open_data(args, spec, splits=None):
    """What every seed shares: the classes, the labelled pool (in memory) or the number of
    labels to stream, and the validation and test streams. splits: train/val/test -> Jets
    to use instead of the --data files."""
    source = lambda split: splits[split] if splits is not None else args.data
    # counting the training jets reads only the files' metadata
    train = make_stream(args, spec, source("train"), "train", n_jets=args.n_jets, batch_size=1)
    if splits is not None:
        classes = np.unique(np.asarray(splits["train"].y))
    elif args.data == "toptagging":
        classes = np.array([0, 1])
    else:  # JetClass-layout files hold one class each: <prefix>_<k>.root
        by_prefix = {common.PREFIX[c]: i for i, c in enumerate(common.CLASSES)}
        classes = np.unique([by_prefix[Path(f).name.rsplit("_", 1)[0]] for f in train.files])
    if len(classes) < 2:
        raise SystemExit(f"--data {args.data}: the training split has a single class")
    if args.task == "cwola" and (len(classes) != 2 or classes[0] != 0):
        raise SystemExit("--task cwola needs two-class data with QCD (e.g. --data pythia or "
                         "toptagging)")
    names = ["QCD", "top"] if args.data == "toptagging" else [common.CLASSES[c] for c in classes]
    spec.update(classes=names, n_classes=len(classes), transform=functools.partial(
        prepare_batch, classes=classes, min_subjets=args.min_subjets, subjets=spec["subjets"],
        encoder_transform=spec["encoder_transform"]))
    n = args.n_labels if args.n_labels is not None else round(args.label_frac * train.n)
    n = max(1, min(n, train.n))
    data = dict(classes=classes, n_labels=n, pool=None, val_pool=None)
    if splits is None and n > MAX_IN_MEMORY and args.task == "cwola":
        raise SystemExit(f"--task cwola mixes its samples in memory: at most {MAX_IN_MEMORY} "
                         f"labelled jets, not {n}; lower --n-labels or --label-frac")
    if splits is not None or n <= MAX_IN_MEMORY:  # a pool to draw each seed's subset from
        pool = min(train.n, max(n, min(MAX_IN_MEMORY, 10 * n)))
        data["pool"] = (splits["train"][:pool] if splits is not None else common.load_jets(
            args.data, args.data_dir, "train", pool, args.n_max, spec["features"]))
    eval_kw = dict(n_jets=args.n_eval, shuffle=False, drop_last=False)
    n_val = args.n_val or args.n_eval
    if args.task == "cwola":  # the mixed validation sample is made per seed from this pool
        cap = min(n_val or MAX_IN_MEMORY, MAX_IN_MEMORY)
        data["val_pool"] = (splits["val"][:cap] if splits is not None else common.load_jets(
            args.data, args.data_dir, "val", cap, args.n_max, spec["features"]))
    else:
        data["val"] = make_stream(args, spec, source("val"), "val", **dict(eval_kw, n_jets=n_val))
    data["test"] = make_stream(args, spec, source("test"), "test", **eval_kw)
    return data


def seed_streams(args, spec, data, seed):
    """This seed's labelled training stream, its validation stream (CWoLa: mixed per seed) and
    the stream of training jets that precise_bn reads (in order, at most PRECISE_BN_JETS)."""
    if data["pool"] is None:  # a large label set streams: the files' first jets, every seed
        stats = make_stream(args, spec, args.data, "train", shuffle=False, drop_last=False,
                            n_jets=min(data["n_labels"], PRECISE_BN_JETS))
        train = make_stream(args, spec, args.data, "train", n_jets=data["n_labels"], seed=seed)
        return train, data["val"], stats, train.n
    rng = np.random.default_rng(common.seed_of(seed, "labels"))
    y = np.searchsorted(data["classes"], np.asarray(data["pool"].y))
    idx = label_subset(y, data["n_labels"], rng)
    labels = y[idx]
    val = data.get("val")
    if args.task == "cwola":  # weak labels everywhere but on test
        mix, labels = cwola_mixture(labels, args.signal_frac, rng)
        idx = idx[mix]
        vy = np.searchsorted(data["classes"], np.asarray(data["val_pool"].y))
        vmix, vlabels = cwola_mixture(vy, args.signal_frac, rng)
        val = make_stream(args, spec, data["val_pool"][vmix], shuffle=False, drop_last=False,
                          extra={"label": vlabels})
    elif len(np.unique(labels)) < len(data["classes"]):
        # label_subset takes every class the pool holds: the pool itself lacks these, and more
        # --n-labels cannot add them (the split is spread over its files by --n-jets)
        lack = [spec["classes"][k] for k in range(len(data["classes"])) if k not in y]
        raise SystemExit(f"the training jets read for the labels ({len(y)}) hold no "
                         f"{', '.join(lack)} jet: raise --n-jets (now {args.n_jets}, spread over "
                         "the class files) or remove those classes' files from --data-dir")
    stats_idx = rng.permutation(len(idx))[:PRECISE_BN_JETS]  # every class, not the pool's first
    stats = make_stream(args, spec, data["pool"][idx[stats_idx]], shuffle=False, drop_last=False,
                        extra={"label": labels[stats_idx]})
    # equal batches that use every labelled jet each epoch: the last batch is filled up with
    # jets drawn once per seed (the same < batch-size jets are seen twice in every epoch)
    batch_size = min(args.batch_size, len(idx))  # 100 labels still make a step
    fill = rng.choice(len(idx), size=-len(idx) % batch_size, replace=False)
    idx = np.concatenate([idx, idx[fill]])
    labels = np.concatenate([labels, labels[fill]])
    train = make_stream(args, spec, data["pool"][idx], seed=seed, extra={"label": labels},
                        batch_size=batch_size)
    return train, val, stats, len(idx) - len(fill)


# --- one run ----------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, stream, s, spec, n_repr=0, split="test"):
    """One pass over an evaluation stream: class probabilities (N, K) and labels (N,) of the
    selected jets (--min-subjets), and (z, y): the jet vectors and labels of n_repr of them drawn
    at random (a fixed generator; kept in the stream's order), or None. A stream that reads one
    class's files after another's would give only one class in its first jets."""
    model.eval()
    probs, labels, rep = [], [], None
    draw = torch.Generator().manual_seed(0)
    for batch in common.loader(stream, s.device):
        with s.ctx:
            logits, jet = model(spec["module"].encoder_inputs(batch, spec["cfg"]))
        keep = batch["keep"]
        label = batch["label"]
        if (label < 0).any():
            at = batch["source"][label < 0][0]
            raise SystemExit(f"{stream.describe(at)}: a jet of a class the training jets lack")
        probs.append(logits.float().softmax(-1)[keep].cpu())
        labels.append(label[keep].cpu())
        if n_repr:  # keep the n_repr smallest of one uniform random key per jet
            new = (torch.rand(int(keep.sum()), generator=draw), jet.float()[keep].cpu(),
                   label[keep].cpu())
            rep = new if rep is None else tuple(torch.cat(t) for t in zip(rep, new))
            if len(rep[0]) > n_repr:
                kept = rep[0].topk(n_repr, largest=False).indices.sort().values
                rep = tuple(t[kept] for t in rep)
    probs = torch.cat(probs).numpy()
    labels = torch.cat(labels).numpy()
    if len(labels) == 0:
        raise SystemExit(f"no {split} jet has --min-subjets {spec['min_subjets']}: lower it")
    if not np.isfinite(probs).all():
        raise SystemExit(f"the model's outputs on the {split} jets are not finite; stopping "
                         "without results")
    return probs, labels, None if rep is None else (rep[1].numpy(), rep[2].numpy())


def selection_score(metrics, n_classes):
    """What picks the step on validation: AUC for two classes, accuracy otherwise."""
    value = metrics["auc"] if n_classes == 2 else metrics["acc"]
    return metrics["acc"] if np.isnan(value) else value


def run_seed(args, s, seed, spec, data, log, n_repr=0):
    """Train one head (+ encoder) with this seed. Returns dict(metrics, probs, labels, z,
    history, n_train, n_val, model): the test metrics of the weights chosen on validation."""
    train, val, stats, n_train = seed_streams(args, spec, data, seed)
    inputs = lambda batch: spec["module"].encoder_inputs(batch, spec["cfg"])
    torch.manual_seed(common.seed_of(seed, "init"))
    encoder = spec["module"].build_encoder(spec["cfg"])
    if spec["state"] is not None:
        encoder.load_state_dict(spec["state"])
    with torch.no_grad():  # widths and token slots from one forward on a validation batch
        tokens, _, jet = encoder.eval()(**inputs(next(iter(val.set_epoch(0)))))
    raw_model = Classifier(encoder, args.head, spec["n_classes"], tokens.shape[-1], jet.shape[-1],
                           tokens.shape[1], args.head_hidden).to(s.device)
    model = common.wrap_model(raw_model, s)
    head_params = [p for n, p in raw_model.named_parameters() if not n.startswith("encoder.")]
    groups = common.decay_groups(head_params, args.weight_decay, name="head")
    if args.mode == "finetune":
        groups += common.decay_groups(encoder, args.weight_decay, name="backbone")
    optimizer = common.configure_optimizer(groups, args.lr, args.weight_decay,
                                           device_type=s.device_type, kind=args.optimizer)
    common.optimizer_mode(optimizer, "train")
    min_lr = args.lr if args.optimizer == "schedulefree" else 0.0  # schedule-free: no decay

    per_epoch = len(train)
    total = args.steps or max(args.epochs * per_epoch, args.min_steps)
    every = args.eval_every or math.ceil(total / 20)
    warmup = common.warmup_steps(args.warmup, total)
    if args.schedule == "frozen-then-unfrozen" and args.freeze_steps >= total:
        warnings.warn(f"--freeze-steps {args.freeze_steps} >= the run's {total} steps: the "
                      "backbone never trains (a probe); lower --freeze-steps", stacklevel=2)
    history, best, best_state, best_step = [], -np.inf, None, 0
    frozen = None  # set by the first step
    bar = common.progress_bar(total, train.batch_size, desc=f"seed {seed}")
    loss_sum, n_loss, t0 = 0.0, 0, time.time()
    for step, _, batch in common.train_batches(train, s.device, args.epochs, steps=total):
        lr = common.lr_at(step, total, warmup, args.lr, min_lr)
        b_lr = backbone_lr(step, lr, args)
        if frozen != (b_lr == 0.0):
            frozen = b_lr == 0.0
            set_frozen(encoder, frozen)
        model.train()
        encoder.train(not frozen)
        for group in optimizer.param_groups:
            group["lr"] = lr if group["name"] == "head" else b_lr
        # 1. forward: jets left out by --min-subjets weigh 0
        with s.ctx:
            logits, _ = model(inputs(batch), backbone_grad=not frozen)
        loss = selected_loss(logits, batch["label"], batch["keep"], args.label_smoothing)
        # 2. backward + step; a non-finite loss stops the run here, naming the step and file
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        common.check_finite(loss, step, train.describe(batch["source"][0]))
        optimizer.step()
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1  # check_finite synced already
        bar.update(train.batch_size)
        if step % args.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.write(f"step {step}/{total}: loss {loss.item():.4f}, lr {lr:.2e}, "
                      f"dt {dt * 1000:.0f} ms")
        # 3. validation: every `every` steps and at the end, with the head's statistics of now
        done = step + 1
        if done % every == 0 or done == total:
            with common.averaged_weights(optimizer):  # schedule-free: score and keep the average
                precise_bn(raw_model, stats, s, inputs)
                probs, y, _ = predict(model, val, s, spec, split="validation")
                metrics = common.roc_metrics(y, probs)
                score = selection_score(metrics, spec["n_classes"])
                if score > best:
                    best, best_step = score, done
                    best_state = copy.deepcopy(raw_model.state_dict())
            point = dict(epoch=round(done / per_epoch, 4), step=done, val_acc=metrics["acc"],
                         val_auc=metrics["auc"], train_loss=loss_sum / n_loss)
            history.append(point)
            log.log(dict(seed=seed, **point, lr=lr, backbone_lr=b_lr, val=_scalars(metrics)))
            bar.write(f"seed {seed} epoch {point['epoch']:g} (step {done}): train loss "
                      f"{point['train_loss']:.4f}, val acc {metrics['acc']:.4f}, "
                      f"val auc {metrics['auc']:.4f} ({len(y)} jets)")
            loss_sum, n_loss, t0 = 0.0, 0, time.time()  # evaluation is no step's dt
    bar.close()
    ok = converged(best_step, total)
    late = "" if ok else ", in the last quarter: not converged"
    print(f"seed {seed}: {total} optimizer steps ({per_epoch} per epoch of {n_train} jets), best "
          f"validation at step {best_step}{late}")
    raw_model.load_state_dict(best_state)
    precise_bn(raw_model, stats, s, inputs)
    probs, labels, rep = predict(model, data["test"], s, spec, n_repr)
    return dict(metrics=common.roc_metrics(labels, probs), probs=probs, labels=labels, rep=rep,
                history=history, n_train=n_train, n_val=len(y), steps=total, warmup=warmup,
                steps_to_converge=best_step, converged=ok, model=raw_model)


def _scalars(metrics, names=None):
    """Flatten roc_metrics' output (per_class nested for multi-class) into name -> float."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for c, m in metrics.get("per_class", {}).items():
        for k, v in m.items():
            out[f"{k}_{names[int(c)] if names else c}"] = v
    return out


# --- report -----------------------------------------------------------------------------------


def roc_curve(is_signal, score):
    """(eps_S, eps_B) as the threshold sweeps down the sorted scores."""
    order = np.argsort(-score, kind="stable")
    hit = is_signal[order]
    return np.cumsum(hit) / max(1, hit.sum()), np.cumsum(~hit) / max(1, (~hit).sum())


def plot_roc(path, y, probs_by_seed, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for c in range(1, len(names)):  # one-vs-QCD; binary: the one curve
        for i, probs in enumerate(probs_by_seed):
            sel = (y == c) | (y == 0)
            s = probs[sel, c] / np.maximum(probs[sel, c] + probs[sel, 0], 1e-30)
            eff_s, eff_b = roc_curve(y[sel] == c, s)
            keep = eff_b > 0
            ax.plot(eff_s[keep], 1 / eff_b[keep], color=f"C{c - 1}", lw=1,
                    label=f"{names[c]} vs {names[0]}" if i == 0 else None)
    ax.set(yscale="log", xlabel="signal efficiency $\\epsilon_S$",
           ylabel="background rejection $1/\\epsilon_B$", xlim=(0, 1))
    ax.set_title(f"{len(probs_by_seed)} seed(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _finite(metrics):
    """JSON has no inf/NaN: a metric undefined on this test set is null."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def main(args, splits=None):
    """Fine-tune --seeds times and write the results. splits: train/val/test -> common.Jets in
    memory, used instead of the --data files (notebooks, tests)."""
    s = common.setup(args)
    if s.ddp:
        raise SystemExit("finetune.py runs in one process: launch it with python, not torchrun")
    spec = load_spec(args)
    data = open_data(args, spec, splits)
    # the labels used, not those asked for: --n-labels beyond the split takes the whole split
    labels = f"n{data['n_labels']}" if args.n_labels is not None else f"f{args.label_frac:g}"
    task = f"cwola{args.signal_frac:g}" if args.task == "cwola" else ""
    name = args.name or "_".join(x for x in (
        Path(args.ckpt).stem if args.ckpt else f"part-{args.size}",
        "scratch" if args.scratch else "", args.mode, args.head, labels, task,
        f"min{args.min_subjets}sj" if args.min_subjets else "") if x)
    out = Path(args.out) / name
    common.claim_output(out / "results.json", args)
    if args.overwrite:  # results.json means a finished run: not the old one beside a new log
        (out / "results.json").unlink(missing_ok=True)
    log = common.JsonlLogger(out / "log.jsonl")
    how = ("in memory, a stratified subset per seed" if data["pool"] is not None else
           "streamed: the first jets of every file, the same for every seed")
    print(f"{name}: method {spec['method']}, classes {spec['classes']}, features "
          f"{spec['features']}, {data['n_labels']} labelled training jets ({how}), device "
          f"{s.device}, git {common.git_hash()}")
    seeds = [args.seed + k for k in range(args.seeds)]
    runs = []
    for k, seed in enumerate(seeds):
        runs.append(run_seed(args, s, seed, spec, data, log, n_repr=N_REPR if k == 0 else 0))
        runs[-1]["scalars"] = _scalars(runs[-1]["metrics"], spec["classes"])
        print(f"seed {seed} test ({len(runs[-1]['labels'])} jets): "
              + "  ".join(f"{m} {v:.4g}" for m, v in runs[-1]["scalars"].items()))
    per_seed = [r["scalars"] for r in runs]
    keys = per_seed[0].keys()
    with np.errstate(invalid="ignore"):  # rej = inf when no background passes: std is nan
        mean = {m: float(np.mean([r[m] for r in per_seed])) for m in keys}
        std = {m: float(np.std([r[m] for r in per_seed])) for m in keys}
    results = dict(
        name=name, method=spec["method"], ckpt=args.ckpt, task=args.task, classes=spec["classes"],
        n_labels=data["n_labels"], labels="memory" if data["pool"] is not None else "stream",
        n_train=runs[0]["n_train"], n_val=runs[0]["n_val"], n_test=len(runs[0]["labels"]),
        steps=runs[0]["steps"], warmup=runs[0]["warmup"],
        seeds=seeds, args=vars(args),
        mean=_finite(mean), std=_finite(std), per_seed=[_finite(r) for r in per_seed],
        history=[r["history"] for r in runs],
        steps_to_converge=[r["steps_to_converge"] for r in runs],
        converged=[r["converged"] for r in runs],
        git=common.git_hash(), versions=common.versions())
    with open(out / "test_repr.npz.tmp", "wb") as f:
        np.savez(f, z=runs[0]["rep"][0], y=runs[0]["rep"][1])
    os.replace(out / "test_repr.npz.tmp", out / "test_repr.npz")
    plot_roc(out / "roc.png", runs[0]["labels"], [r["probs"] for r in runs], spec["classes"])
    common.write_json_atomic(out / "results.json", results)  # last: it means a finished run
    print(f"test, {args.seeds} seed(s): " + "  ".join(f"{m} {mean[m]:.4g} +- {std[m]:.2g}"
                                                    for m in keys))
    print(f"wrote {out / 'results.json'}, test_repr.npz and roc.png")
    common.cleanup(s)
    return results


if __name__ == "__main__":
    main(get_args())
