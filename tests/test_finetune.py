"""finetune.py end to end: every mode and head on generated jets, --scratch, checkpoints of other
methods, the frozen-then-unfrozen schedule, CWoLa, multi-class data."""
import json

import numpy as np
import pytest
import torch

import common
import finetune

TINY = dict(in_dim=7, dim=16, heads=2, depth=1, cls_depth=1, pair_dim=(8,), mlp_ratio=2,
            embed_hidden=(16,))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A "pretrained" checkpoint of the shared encoder at a tiny size."""
    torch.manual_seed(0)
    encoder = common.Encoder(common.EncoderConfig(**TINY))
    path = tmp_path_factory.mktemp("ckpt") / "part.pt"
    common.save_checkpoint(path, method="part", args=dict(features="kin"), model=encoder,
                           encoder=encoder, encoder_config=TINY)
    return path


def get_args(argv):
    return finetune.get_args([str(a) for a in argv])


def flags(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--out", str(out), "--n-max", "16", "--epochs", "2",
            "--batch-size", "16", "--warmup", "2", "--device", "cpu", *map(str, extra)]


def encoder_state(model):
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# --- every mode and head on the tiny generated sample -----------------------------------------


@pytest.mark.parametrize("head", ["linear", "mlp", "cls-attn", "flatten", "mean"])
def test_modes_and_heads(tiny_pythia, tiny_ckpt, tmp_path, head):
    ckpt_encoder = common.load_checkpoint(tiny_ckpt)["encoder"]
    for mode in ("probe", "finetune"):
        args = get_args(["--ckpt", tiny_ckpt, "--mode", mode, "--head", head,
                                  *flags(tiny_pythia, tmp_path)])
        spec = finetune.load_spec(args)
        jets, y = finetune.prepare(args, spec)
        data = finetune.seed_data(args, spec, jets, y, seed=0)
        s = common.setup(args)
        metrics, probs, model = finetune.run_seed(args, s, 0, spec, data,
                                                  common.JsonlLogger(tmp_path / "log.jsonl"))
        assert probs.shape == (len(y["test"]), 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["auc"] <= 1
        assert same(encoder_state(model), ckpt_encoder) == (mode == "probe"), mode


def test_main_writes_results_and_plot(tiny_pythia, tiny_ckpt, tmp_path):
    argv = ["--ckpt", tiny_ckpt, "--mode", "probe", "--head", "mean", "--seeds", "2",
            "--label-frac", "0.5", "--name", "run", *flags(tiny_pythia, tmp_path)]
    results = finetune.main(get_args(argv))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["mean"] == results["mean"] and len(saved["per_seed"]) == 2
    for key in ("acc", "auc", "rej50", "rej30"):
        vals = [r[key] for r in saved["per_seed"]]
        assert saved["mean"][key] == pytest.approx(np.mean(vals), nan_ok=True)  # rej may be inf
        with np.errstate(invalid="ignore"):                         # std of [inf, inf]
            assert saved["std"][key] == pytest.approx(np.std(vals), nan_ok=True)
    assert saved["n_train"] == 40                                   # half of 80 training jets
    assert (tmp_path / "run" / "roc.png").stat().st_size > 1000
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4  # 2 seeds x 2 ep
    again = finetune.main(get_args(argv))                  # same seed: same numbers
    assert again["per_seed"] == results["per_seed"]


def test_scratch_preset_without_ckpt(tiny_pythia, tmp_path, monkeypatch):
    monkeypatch.setitem(common.ENCODER_PRESETS, "small", common.EncoderConfig(**TINY))
    args = get_args(["--scratch", "--mode", "finetune", "--name", "s",
                              *flags(tiny_pythia, tmp_path)])
    results = finetune.main(args)
    assert results["method"] == "part" and results["args"]["preset"] == "small"
    with pytest.raises(SystemExit):
        get_args(flags(tiny_pythia, tmp_path))             # neither --ckpt nor --scratch


def test_scratch_with_ckpt_uses_its_architecture_not_its_weights(tiny_ckpt):
    args = get_args(["--ckpt", tiny_ckpt, "--scratch"])
    spec = finetune.load_spec(args)
    assert spec["state"] is None and spec["cfg"]["dim"] == 16 and spec["features"] == "kin"
    assert finetune.load_spec(get_args(["--ckpt", tiny_ckpt]))["state"] is not None


# --- the frozen-then-unfrozen schedule ---------------------------------------------------------


def test_backbone_lr_schedule():
    args = get_args(["--scratch", "--mode", "finetune", "--schedule",
                              "frozen-then-unfrozen", "--freeze-steps", "10", "--ramp-steps", "4"])
    lrs = [finetune.backbone_lr(step, 1e-3, args) for step in range(16)]
    assert lrs[:10] == [0.0] * 10 and lrs[10] == pytest.approx(1e-8)
    assert lrs[12] == pytest.approx(1e-8 + 0.5 * (1e-3 - 1e-8)) and lrs[14:] == [1e-3, 1e-3]
    with pytest.raises(SystemExit):                                  # needs --mode finetune
        get_args(["--scratch", "--schedule", "frozen-then-unfrozen"])


def test_frozen_then_unfrozen_end_to_end(tiny_pythia, tiny_ckpt, tmp_path, monkeypatch):
    built, snapshots = [], []
    build = common.build_encoder
    monkeypatch.setattr(common, "build_encoder", lambda m, c: built.append(build(m, c)) or built[-1])
    lr_fn = finetune.backbone_lr

    def spy(step, head_lr, args):  # called at the start of each step: weights after step - 1
        snapshots.append({k: v.clone() for k, v in built[-1].state_dict().items()})
        return lr_fn(step, head_lr, args)
    monkeypatch.setattr(finetune, "backbone_lr", spy)
    args = get_args(["--ckpt", tiny_ckpt, "--mode", "finetune", "--schedule",
                              "frozen-then-unfrozen", "--freeze-steps", "4", "--ramp-steps", "2",
                              "--lr", "1e-2", *flags(tiny_pythia, tmp_path)])
    spec = finetune.load_spec(args)
    jets, y = finetune.prepare(args, spec)
    data = finetune.seed_data(args, spec, jets, y, seed=0)
    finetune.run_seed(args, common.setup(args), 0, spec, data,
                      common.JsonlLogger(tmp_path / "log.jsonl"))
    start = common.load_checkpoint(tiny_ckpt)["encoder"]
    assert len(snapshots) == 10                                      # 80 jets / 16 x 2 epochs
    for step in range(5):                                            # after steps 0..3: frozen
        assert same(snapshots[step], start), step
    assert not same(snapshots[6], start)                             # joined at step 4
    assert not same({k: v for k, v in built[-1].state_dict().items()}, start)


# --- CWoLa ---------------------------------------------------------------------------------------


def test_cwola_mixture_counts():
    y = np.repeat([0, 1], [400, 100])
    idx, sample = finetune.cwola_mixture(y, 0.25, np.random.default_rng(0))
    assert len(set(idx)) == len(idx) == 400 and (sample == 0).sum() == (sample == 1).sum() == 200
    assert (y[idx[sample == 0]] == 0).all()                          # sample 0: pure QCD
    assert y[idx[sample == 1]].sum() == 50                           # sample 1: 25 % signal
    with pytest.raises(SystemExit, match="signal-frac"):
        finetune.cwola_mixture(y, 0.9, np.random.default_rng(0))     # 180 > 100 signal jets


def synthetic_jets(n_per_class, classes, seed, n=8, shift=1.5, scale=None):
    """Separable jets: class c shifts the first feature of every particle by shift * c."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n_per_class)
    valid = np.arange(n)[None] < rng.integers(2, n + 1, len(y))[:, None]
    x = rng.normal(size=(len(y), n, 7)).astype(np.float32)
    label = np.searchsorted(classes, y)[:, None]
    if scale:  # symmetric signal: a wider first feature, no shift a random function could ride
        x[..., 0] *= 1 + (scale - 1) * label
    else:
        x[..., 0] += shift * label
    p4 = np.abs(rng.normal(size=(len(y), n, 4))).astype(np.float32) + 1.0
    p4[..., 3] = 3 * p4[..., :3].sum(-1)                             # E above |p|: massive
    x, p4 = x * valid[..., None], p4 * valid[..., None]
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64),
                       jet=np.zeros((len(y), 4), np.float32))


def use_synthetic(monkeypatch, classes, n_train):
    sizes = dict(train=n_train, val=n_train // 2, test=n_train // 2)
    seeds = dict(train=1, val=2, test=3)
    monkeypatch.setattr(common, "load_jets", lambda source, split, **kw: synthetic_jets(
        sizes[split], classes, seeds[split]))


FLAT = """
import torch.nn as nn
class Flat(nn.Module):  # no weights: the jet vector is every particle feature side by side
    def forward(self, x, valid):
        return x, valid, x.flatten(1)
def build_encoder(cfg):
    return Flat()
def encoder_inputs(jets, cfg):  # own inputs: batches are not trimmed, the width stays fixed
    return dict(x=jets.x, valid=jets.valid)
"""


def test_cwola_needs_signal_to_learn(tmp_path, monkeypatch):
    """A linear probe on raw features (112 dims, the signal along one direction) keeps what a
    random classifier picks up by chance small, so S = 0 must land near AUC 0.5 on true labels."""
    (tmp_path / "flatfeat.py").write_text(FLAT)
    monkeypatch.syspath_prepend(str(tmp_path))
    import flatfeat
    common.save_checkpoint(tmp_path / "flat.pt", method="flatfeat", args={}, model=flatfeat.Flat(),
                           encoder=flatfeat.Flat(), encoder_config={})
    sizes, seeds = dict(train=1000, val=500, test=500), dict(train=1, val=2, test=3)
    monkeypatch.setattr(common, "load_jets", lambda source, split, **kw: synthetic_jets(
        sizes[split], [0, 8], seeds[split], n=16, shift=0.7))
    auc = {}
    for frac in (0.0, 0.6):
        args = get_args(["--ckpt", tmp_path / "flat.pt", "--task", "cwola", "--signal-frac", frac,
                         "--seeds", 3, "--lr", "1e-2", "--epochs", 6, "--batch-size", 64,
                         "--warmup", 2, "--device", "cpu", "--out", tmp_path])
        auc[frac] = [r["auc"] for r in finetune.main(args)["per_seed"]]   # true test labels
    assert all(abs(a - 0.5) < 0.1 for a in auc[0.0]), auc
    assert all(a > 0.75 for a in auc[0.6]), auc
    with pytest.raises(SystemExit):
        get_args(["--scratch", "--task", "cwola"])                        # no --signal-frac


# --- other data and other methods -------------------------------------------------------------


def test_multiclass_reports_one_vs_qcd(tiny_ckpt, tmp_path, monkeypatch):
    use_synthetic(monkeypatch, [0, 1, 8], 64)
    args = get_args(["--ckpt", tiny_ckpt, "--head", "linear", "--epochs", "1",
                              "--batch-size", "32", "--device", "cpu", "--out", tmp_path])
    results = finetune.main(args)
    assert results["classes"] == ["QCD", "Hbb", "Tbqq"]
    assert {"acc", "auc", "auc_Hbb", "auc_Tbqq", "rej50_Tbqq"} <= set(results["mean"])


def test_checkpoint_of_another_method(tmp_path, monkeypatch):
    """A method with its own encoder and inputs (like jjepa's subjets) is rebuilt by name."""
    (tmp_path / "toyssl.py").write_text('''
import torch, torch.nn as nn
class Enc(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(3, width)
    def forward(self, feats, mask):                  # (B, S, 3), (B, S)
        tokens = self.lin(feats) * mask[..., None]
        return tokens, mask, tokens.sum(1)
def build_encoder(cfg):
    return Enc(cfg["width"])
def encoder_inputs(jets, cfg):
    return dict(feats=jets.x[:, :5, :3], mask=jets.valid[:, :5])
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    import toyssl
    enc = toyssl.build_encoder(dict(width=6))
    common.save_checkpoint(tmp_path / "toyssl.pt", method="toyssl", args={}, model=enc,
                           encoder=enc, encoder_config=dict(width=6))
    use_synthetic(monkeypatch, [0, 8], 64)
    for head in ("flatten", "cls-attn"):
        args = get_args(["--ckpt", tmp_path / "toyssl.pt", "--mode", "finetune",
                                  "--head", head, "--epochs", "1", "--batch-size", "32",
                                  "--device", "cpu", "--out", tmp_path])
        results = finetune.main(args)
        assert results["method"] == "toyssl" and 0 <= results["mean"]["auc"] <= 1
