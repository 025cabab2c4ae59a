"""finetune.py: measure what a pretrained jet encoder is worth on labelled jets.

Loads the encoder of any method's checkpoint (rebuilt from the method name and encoder config
stored in it), puts a small head on top and trains on the training split:
  --mode probe      the encoder is frozen (eval mode, no gradients): only the head learns.
  --mode finetune   everything learns; with --schedule frozen-then-unfrozen the backbone is
                    frozen for --freeze-steps, then joins at lr 1e-8 ramping linearly to the
                    head's lr over --ramp-steps (MPM v2, arXiv 2409.12589).
  --scratch         the same architecture from random weights: the supervised baseline. Without
                    --ckpt it is the shared ParT-lite encoder of --preset (small or part).
Heads: linear / mlp on the encoder's jet vector, mean (average of the valid tokens + linear),
flatten (all token slots + linear), cls-attn (two class-attention blocks reading the tokens).
--task cwola trains on two mixed samples labelled only by sample (pure QCD vs QCD plus a
fraction --signal-frac of signal; CWoLa, arXiv 1708.02949) and is scored on the true labels.

The epoch (or --eval-every step) is chosen on the validation split; the test split is used only
for the reported numbers: accuracy, AUC and background rejection 1/eps_B at eps_S = 0.5 and 0.3
(multi-class: accuracy and one-vs-QCD AUCs), mean +- std over --seeds runs. Writes
<out>/<name>/results.json, roc.png (every seed) and log.jsonl.

    python finetune.py --ckpt out/mpm.pt --mode probe --head linear
    python finetune.py --ckpt out/mpm.pt --mode finetune --head cls-attn --label-frac 0.1 --seeds 3
    python finetune.py --scratch --preset part --mode finetune --data toptagging --seeds 3
    python finetune.py --ckpt out/mpm.pt --task cwola --signal-frac 0.05 --mode finetune
Tiny CPU run: python finetune.py --scratch --mode finetune --n-jets 1000 --epochs 2 --device cpu
"""
import argparse
import copy
import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

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
                        "checkpoint's architecture, or --preset without --ckpt)")
    g.add_argument("--preset", choices=sorted(common.ENCODER_PRESETS), default="small",
                   help="ParT-lite encoder size for --scratch without --ckpt (part = ParT's size)")
    g.add_argument("--features", choices=["kin", "full"], default=None,
                   help="particle features (default: the checkpoint's; kin for --scratch)")
    g = p.add_argument_group("how")
    g.add_argument("--mode", choices=["probe", "finetune"], default="probe",
                   help="probe: frozen encoder, only the head trains; finetune: all weights train")
    g.add_argument("--head", choices=["linear", "mlp", "cls-attn", "flatten", "mean"],
                   default="linear",
                   help="linear/mlp: on the jet vector; mean: average of the valid tokens + linear;"
                        " flatten: all token slots + linear; cls-attn: 2 class-attention blocks")
    g.add_argument("--head-hidden", type=int, default=128, help="hidden width of the mlp head")
    labels = g.add_mutually_exclusive_group()
    labels.add_argument("--label-frac", type=float, default=1.0,
                        help="fraction of the training jets whose labels are used (stratified)")
    labels.add_argument("--n-labels", type=int, default=None,
                        help="number of labelled training jets (stratified), instead of a fraction")
    g.add_argument("--seeds", type=int, default=1,
                   help="independent runs (seed, seed+1, ...): label subset, head init, data order")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing (MPM v2 used 0.1)")
    g.add_argument("--schedule", choices=["constant", "frozen-then-unfrozen"], default="constant",
                   help="finetune: train the backbone from the start, or freeze it first")
    g.add_argument("--freeze-steps", type=int, default=100,
                   help="frozen-then-unfrozen: steps with the backbone frozen (MPM v2: 5000, or "
                        "100 for <= 1000 jets)")
    g.add_argument("--ramp-steps", type=int, default=100,
                   help="frozen-then-unfrozen: steps over which the backbone lr ramps from 1e-8 "
                        "to the head's")
    g.add_argument("--task", choices=["supervised", "cwola"], default="supervised",
                   help="cwola: learn from two mixed samples labelled by sample only")
    g.add_argument("--signal-frac", type=float, default=None,
                   help="cwola: fraction of signal jets in the second mixed sample")
    g.add_argument("--name", default=None,
                   help="results folder under --out (default: built from method, mode, head, labels)")
    common.add_common_args(p, skip=("resume",))
    p.set_defaults(epochs=20, batch_size=256, lr=1e-3, weight_decay=0.01, warmup=100)
    args = p.parse_args(argv)
    if args.ckpt is None and not args.scratch:
        p.error("give --ckpt (a pretrained encoder) or --scratch (random init of --preset)")
    if args.task == "cwola" and args.signal_frac is None:
        p.error("--task cwola needs --signal-frac S (fraction of signal in the mixed sample)")
    if args.task != "cwola" and args.signal_frac is not None:
        p.error("--signal-frac is used only with --task cwola")
    if args.signal_frac is not None and not 0.0 <= args.signal_frac <= 1.0:
        p.error(f"--signal-frac must be in [0, 1], got {args.signal_frac}")
    if not 0.0 < args.label_frac <= 1.0:
        p.error(f"--label-frac must be in (0, 1], got {args.label_frac}")
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
    bkg, sig = rng.permutation(np.flatnonzero(y == 0)), rng.permutation(np.flatnonzero(y == 1))
    half = len(bkg) // 2
    n_sig = round(signal_frac * half)
    if n_sig > len(sig):
        raise SystemExit(f"--signal-frac {signal_frac}: the mixed sample needs {n_sig} signal "
                         f"jets but the split has {len(sig)}; lower --signal-frac")
    idx = np.concatenate([bkg[:half], bkg[half:2 * half - n_sig], sig[:n_sig]])
    return idx, np.repeat([0, 1], half)


# --- the classifier: encoder + head -----------------------------------------------------------


class Classifier(nn.Module):
    """encoder(**inputs) -> (tokens (B, N, C), valid (B, N), jet (B, C)) -> head -> logits (B, K)."""

    def __init__(self, encoder, head, n_classes, dim_tokens, dim_jet, n_tokens, hidden=128):
        super().__init__()
        self.encoder, self.kind, self.n_tokens = encoder, head, n_tokens
        if head == "linear":
            self.head = nn.Linear(dim_jet, n_classes)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(dim_jet, hidden), nn.GELU(),
                                      nn.Linear(hidden, n_classes))
        elif head == "mean":
            self.head = nn.Linear(dim_tokens, n_classes)
        elif head == "flatten":  # one weight per token slot: needs a fixed number of slots
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
            return self.head(jet)
        tokens = tokens * valid[..., None]                                       # (B, N, C)
        if self.kind == "mean":
            pooled = tokens.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)     # (B, C)
            return self.head(pooled)
        if self.kind == "flatten":  # batches are trimmed: pad back to every slot
            tokens = F.pad(tokens, (0, 0, 0, self.n_tokens - tokens.shape[1]))   # (B, S, C)
            return self.head(tokens.flatten(1))
        B = tokens.shape[0]
        bias = common.attention_bias(torch.cat([valid.new_ones(B, 1), valid], 1), None,
                                     tokens.dtype)                               # (B, 1, 1, 1+N)
        cls = self.cls_token.expand(B, -1, -1)                                   # (B, 1, C)
        for block in self.blocks:
            cls = block(cls, tokens, bias)
        return self.head(self.norm(cls[:, 0]))


def set_frozen(encoder, frozen):
    """Frozen: eval mode (no dropout) and no gradients; otherwise trainable."""
    encoder.train(not frozen)
    encoder.requires_grad_(not frozen)


def backbone_lr(step, head_lr, args):
    """MPM v2's schedule: 0 while frozen, then from 1e-8 linearly up to the head's lr."""
    if args.mode == "probe":
        return 0.0
    if args.schedule == "constant":
        return head_lr
    if step < args.freeze_steps:
        return 0.0
    ramp = min(1.0, (step - args.freeze_steps) / max(1, args.ramp_steps))
    return 1e-8 + ramp * (head_lr - 1e-8)


# --- one run ----------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, arrays, s, batch_size, trim):
    """Class probabilities (N, K) in the arrays' order."""
    model.eval()
    probs = []
    for batch in common.epoch_batches(arrays, batch_size, s.device, shuffle=False,
                                      drop_last=False, trim=trim):
        batch.pop("label")
        with s.ctx:
            logits = model(batch)
        probs.append(logits.float().softmax(-1).cpu())
    return torch.cat(probs).numpy()


def selection_score(metrics, n_classes):
    """What picks the epoch on validation: AUC for two classes, accuracy otherwise."""
    value = metrics["auc"] if n_classes == 2 else metrics["acc"]
    return metrics["acc"] if np.isnan(value) else value


def run_seed(args, s, seed, spec, data, log):
    """Train one head (+ encoder) with this seed; return the test metrics, test probabilities
    (N, K) and the model with the weights of the epoch chosen on validation."""
    train, val, test = data["train"], data["val"], data["test"]
    torch.manual_seed(seed)
    encoder = common.build_encoder(spec["method"], spec["cfg"])
    if spec["state"] is not None:
        encoder.load_state_dict(spec["state"])
    with torch.no_grad():  # widths and token count from one forward on two jets
        probe_in = {k: torch.from_numpy(np.asarray(a[:2])) for k, a in train.items() if k != "label"}
        tokens, _, jet = encoder.eval()(**probe_in)
    raw_model = Classifier(encoder, args.head, spec["n_classes"], tokens.shape[-1], jet.shape[-1],
                           tokens.shape[1], args.head_hidden).to(s.device)
    model = torch.compile(raw_model) if s.compile else raw_model
    head_params = [p for n, p in raw_model.named_parameters() if not n.startswith("encoder.")]
    groups = common.decay_groups(head_params, args.weight_decay, name="head")
    if args.mode == "finetune":
        groups += common.decay_groups(encoder, args.weight_decay, name="backbone")
    optimizer = common.configure_optimizer(groups, args.lr, args.weight_decay,
                                           device_type=s.device_type)

    batch_size = min(args.batch_size, len(train["label"]))  # 100 labels still make a step
    per_epoch = common.steps_per_epoch(len(train["label"]), batch_size)
    total = args.epochs * per_epoch
    if args.schedule == "frozen-then-unfrozen" and args.freeze_steps >= total:
        raise SystemExit(f"--freeze-steps {args.freeze_steps} >= the run's {total} steps: the "
                         "backbone would never train; lower --freeze-steps or raise --epochs")
    best, best_state, frozen = -np.inf, None, None  # frozen: None until the first step sets it
    bar = common.progress_bar(total, batch_size, desc=f"seed {seed}")
    t0, loss_sum, n_loss = time.time(), torch.zeros((), device=s.device), 0
    for step, epoch, batch in common.train_batches(train, batch_size, s.device, args.epochs,
                                                   seed=seed, trim=spec["trim"]):
        lr = common.lr_at(step, total, args.warmup, args.lr)
        b_lr = backbone_lr(step, lr, args)
        if frozen != (b_lr == 0.0):
            frozen = b_lr == 0.0
            set_frozen(encoder, frozen)
        model.train()
        encoder.train(not frozen)
        for group in optimizer.param_groups:
            group["lr"] = lr if group["name"] == "head" else b_lr
        label = batch.pop("label")
        with s.ctx:
            logits = model(batch, backbone_grad=not frozen)
        loss = F.cross_entropy(logits.float(), label, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        loss_sum, n_loss = loss_sum + loss.detach(), n_loss + 1  # no host sync per step
        bar.update(batch_size)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        end_of_epoch = (step + 1) % per_epoch == 0
        if (args.eval_every and (step + 1) % args.eval_every == 0) or \
                (not args.eval_every and end_of_epoch) or step + 1 == total:
            train_time = time.time() - t0  # training only: evaluation is not counted in jets/s
            metrics = common.roc_metrics(val["label"], predict(model, val, s, args.batch_size,
                                                               spec["trim"]))
            score = selection_score(metrics, spec["n_classes"])
            if score > best:
                best, best_state = score, copy.deepcopy(raw_model.state_dict())
            log.log(dict(seed=seed, step=step + 1, epoch=epoch, lr=lr, backbone_lr=b_lr,
                         train_loss=(loss_sum / n_loss).item(), val=_scalars(metrics),
                         jets_per_s=n_loss * batch_size / train_time))
            loss_sum, n_loss = torch.zeros((), device=s.device), 0
            t0 = time.time()
    bar.close()
    raw_model.load_state_dict(best_state)
    probs = predict(model, test, s, args.batch_size, spec["trim"])
    return common.roc_metrics(test["label"], probs), probs, raw_model


def _scalars(metrics, names=None):
    """Flatten roc_metrics' output (per_class nested for multi-class) into name -> float."""
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    for c, m in metrics.get("per_class", {}).items():
        for k, v in m.items():
            out[f"{k}_{names[int(c)] if names else c}"] = v
    return out


# --- data and checkpoint ----------------------------------------------------------------------


def load_spec(args):
    """Which encoder to build: method name, config dict, weights (None = random), features."""
    if args.ckpt is None:
        cfg = dataclasses.asdict(common.ENCODER_PRESETS[args.preset])
        features = args.features or "kin"
        cfg["in_dim"] = len(common.FEATURE_NAMES[features])
        return dict(method="part", cfg=cfg, state=None, features=features)
    ckpt = common.load_checkpoint(args.ckpt)
    if ckpt.get("encoder") is None:
        raise SystemExit(f"{args.ckpt}: the checkpoint holds no encoder weights")
    cfg, stored = ckpt["encoder_config"], ckpt["args"]
    by_width = {len(v): k for k, v in common.FEATURE_NAMES.items()}
    features = args.features or stored.get("features") or by_width.get(cfg.get("in_dim"), "kin")
    if "in_dim" in cfg and cfg["in_dim"] != len(common.FEATURE_NAMES[features]):
        raise SystemExit(f"--features {features} gives {len(common.FEATURE_NAMES[features])} "
                         f"inputs but {args.ckpt} was trained on {cfg['in_dim']}")
    return dict(method=ckpt["method"], cfg=cfg, state=None if args.scratch else ckpt["encoder"],
                features=features)


def prepare(args, spec):
    """Load the three splits, relabel classes 0..K-1, subsample labels or build the CWoLa
    mixtures, and turn each split into the arrays the encoder reads plus `label`."""
    kw = dict(path=args.data_dir, n_max=args.n_max, features=spec["features"])
    jets = dict(train=common.load_jets(args.data, split="train", n_jets=args.n_jets, **kw),
                val=common.load_jets(args.data, split="val", n_jets=args.n_eval, **kw),
                test=common.load_jets(args.data, split="test", n_jets=args.n_eval, **kw))
    classes = np.unique(np.asarray(jets["train"].y))
    for split in ("val", "test"):
        extra = set(np.unique(np.asarray(jets[split].y))) - set(classes)
        if extra:
            raise SystemExit(f"--data {args.data}: {split} has classes {sorted(extra)} that the "
                             "training split lacks")
    if len(classes) < 2:
        raise SystemExit(f"--data {args.data}: the training split has a single class")
    if args.task == "cwola" and (len(classes) != 2 or classes[0] != 0):
        raise SystemExit("--task cwola needs two-class data with QCD (e.g. --data pythia or "
                         "toptagging)")
    names = (["QCD", "top"] if args.data == "toptagging" else [common.CLASSES[c] for c in classes])
    y = {k: np.searchsorted(classes, np.asarray(j.y)) for k, j in jets.items()}
    spec.update(classes=names, n_classes=len(classes))
    # the particle axis can be trimmed per batch only for inputs laid out like particles
    default_inputs = spec["method"] in ("part", "scratch", "supervised") or \
        not hasattr(importlib.import_module(spec["method"]), "encoder_inputs")
    spec["trim"] = ("x", "p4") if default_inputs else ()
    return jets, y


def split_arrays(spec, jets, idx, labels):
    arrays = common.encoder_inputs(spec["method"], jets[idx], spec["cfg"])
    return dict(arrays, label=labels)


def seed_data(args, spec, jets, y, seed):
    """This seed's labelled training jets (and, for CWoLa, mixed validation jets)."""
    rng = np.random.default_rng(seed)
    n = args.n_labels if args.n_labels is not None else round(args.label_frac * len(y["train"]))
    idx = label_subset(y["train"], n, rng)
    data = {}
    if args.task == "cwola":  # weak labels everywhere but on test
        mix, sample = cwola_mixture(y["train"][idx], args.signal_frac, rng)
        data["train"] = split_arrays(spec, jets["train"], idx[mix], sample)
        mix, sample = cwola_mixture(y["val"], args.signal_frac, rng)
        data["val"] = split_arrays(spec, jets["val"], mix, sample)
    else:
        data["train"] = split_arrays(spec, jets["train"], idx, y["train"][idx])
        data["val"] = split_arrays(spec, jets["val"], np.arange(len(y["val"])), y["val"])
    data["test"] = split_arrays(spec, jets["test"], np.arange(len(y["test"])), y["test"])
    return data


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


def main(args):
    s = common.setup(args)
    if s.ddp:
        raise SystemExit("finetune.py runs in one process: launch it with python, not torchrun")
    spec = load_spec(args)
    jets, y = prepare(args, spec)
    labels = f"n{args.n_labels}" if args.n_labels is not None else f"f{args.label_frac:g}"
    task = f"cwola{args.signal_frac:g}" if args.task == "cwola" else ""
    name = args.name or "_".join(x for x in (
        Path(args.ckpt).stem if args.ckpt else f"part-{args.preset}",
        "scratch" if args.scratch else "", args.mode, args.head, labels, task) if x)
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    log = common.JsonlLogger(out / "log.jsonl")
    print(f"{name}: method {spec['method']}, classes {spec['classes']}, features "
          f"{spec['features']}, device {s.device}, git {common.git_hash()}")
    per_seed, probs_by_seed = [], []
    for k in range(args.seeds):
        data = seed_data(args, spec, jets, y, args.seed + k)
        metrics, probs, _ = run_seed(args, s, args.seed + k, spec, data, log)
        per_seed.append(_scalars(metrics, spec["classes"]))
        probs_by_seed.append(probs)
        print(f"seed {args.seed + k}: " + "  ".join(f"{m} {v:.4g}" for m, v in per_seed[-1].items()))
    keys = per_seed[0].keys()
    with np.errstate(invalid="ignore"):  # rej = inf when no background passes: std is nan
        mean = {m: float(np.mean([r[m] for r in per_seed])) for m in keys}
        std = {m: float(np.std([r[m] for r in per_seed])) for m in keys}
    results = dict(name=name, method=spec["method"], ckpt=args.ckpt, classes=spec["classes"],
                   n_train=len(data["train"]["label"]), n_test=len(y["test"]),
                   args=vars(args), mean=mean, std=std, per_seed=per_seed,
                   git=common.git_hash(), versions=common.versions())
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")
    plot_roc(out / "roc.png", y["test"], probs_by_seed, spec["classes"])
    print(f"test, {args.seeds} seed(s): " + "  ".join(f"{m} {mean[m]:.4g} +- {std[m]:.2g}"
                                                    for m in keys))
    print(f"wrote {out / 'results.json'} and {out / 'roc.png'}")
    return results


if __name__ == "__main__":
    main(get_args())
