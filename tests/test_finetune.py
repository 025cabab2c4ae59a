"""finetune.py end to end: every mode and head, --scratch, checkpoints of other methods, the
frozen-then-unfrozen schedule, CWoLa, multi-class data, labels in memory and streamed, the
results study.py reads (history, epochs to converge, test_repr.npz), --min-subjets, and bad input.
Data: the tiny generated files (tiny_pythia) or synthetic in-memory Jets (main(args, splits))."""
import json
import warnings

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
            "--batch-size", "16", "--min-steps", "0", "--warmup", "2", "--device", "cpu",
            *map(str, extra)]


def encoder_state(model):
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def one_seed(args, tmp_path, seed=0, splits=None):
    spec = finetune.load_spec(args)
    data = finetune.open_data(args, spec, splits)
    run = finetune.run_seed(args, common.setup(args), seed, spec, data,
                            common.JsonlLogger(tmp_path / "log.jsonl"))
    return run, data


# --- every mode and head on the tiny generated sample (val and test stream from the files) -----


@pytest.mark.parametrize("head", ["linear", "mlp", "cls-attn", "flatten", "mean"])
def test_modes_and_heads(tiny_pythia, tiny_ckpt, tmp_path, head):
    ckpt_encoder = common.load_checkpoint(tiny_ckpt)["encoder"]
    for mode in ("probe", "finetune"):
        args = get_args(["--ckpt", tiny_ckpt, "--mode", mode, "--head", head,
                         *flags(tiny_pythia, tmp_path)])
        run, data = one_seed(args, tmp_path)
        n_test = data["test"].n
        assert n_test == 10 and run["probs"].shape == (n_test, 2)
        assert np.allclose(run["probs"].sum(1), 1, atol=1e-5)
        assert sorted(run["labels"].tolist()) == [0] * 5 + [1] * 5    # QCD, Tbqq -> 0, 1
        assert 0 <= run["metrics"]["acc"] <= 1 and 0 <= run["metrics"]["auc"] <= 1
        assert same(encoder_state(run["model"]), ckpt_encoder) == (mode == "probe"), mode


def test_main_writes_results_history_and_repr(tiny_pythia, tiny_ckpt, tmp_path, capsys,
                                              monkeypatch):
    argv = ["--ckpt", tiny_ckpt, "--mode", "probe", "--head", "mean", "--seeds", "2",
            "--label-frac", "0.5", "--name", "run", *flags(tiny_pythia, tmp_path)]
    results = finetune.main(get_args(argv))
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and len(saved["per_seed"]) == 2
    for key in ("acc", "auc"):
        vals = [r[key] for r in saved["per_seed"]]
        assert saved["mean"][key] == pytest.approx(np.mean(vals))
        assert saved["std"][key] == pytest.approx(np.std(vals))
    assert saved["n_labels"] == saved["n_train"] == 40              # half of 80 training jets
    assert saved["labels"] == "memory" and saved["n_test"] == 10 and saved["seeds"] == [0, 1]
    # 40 jets + 8 repeated fill 3 equal batches of 16; 2 epochs; ~20 validations: every step
    assert saved["steps"] == 6 and saved["warmup"] == 2
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12                                          # 2 seeds x 6 validations
    for k in range(2):
        hist = saved["history"][k]
        assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
        assert [h["epoch"] for h in hist] == [round(s / 3, 4) for s in range(1, 7)]
        assert set(hist[0]) == {"epoch", "step", "val_acc", "val_auc", "train_loss"}
        assert [h["val_acc"] for h in hist] == [r["val_acc"] for r in log[6 * k:6 * k + 6]]
        best = max(hist, key=lambda h: h["val_auc"])                # the first of equal bests
        assert saved["steps_to_converge"][k] == best["step"]
        assert saved["converged"][k] == (best["step"] <= 4.5)
    printed = capsys.readouterr()
    assert printed.out.count("val acc") + printed.err.count("val acc") == 12
    assert printed.out.count("6 optimizer steps") == 2
    # test_repr.npz: the encoder's jet vectors of the test jets (first seed), and their labels
    rep = np.load(run / "test_repr.npz")
    assert rep["z"].shape == (10, TINY["dim"]) and np.isfinite(rep["z"]).all()
    assert sorted(rep["y"].tolist()) == [0] * 5 + [1] * 5
    assert (run / "roc.png").stat().st_size > 1000
    again = finetune.main(get_args(argv[:7] + ["1"] + argv[8:] + ["--overwrite"]))  # seed 0 only
    assert again["per_seed"][0] == results["per_seed"][0]
    assert np.array_equal(np.load(run / "test_repr.npz")["z"], rep["z"])
    # fewer vectors than test jets: a random draw in the stream's order, not the first jets
    # (the test files are read one class after the other: the first 4 are all one class)
    assert len(set(rep["y"][:4].tolist())) == 1
    monkeypatch.setattr(finetune, "N_REPR", 4)
    finetune.main(get_args(argv[:7] + ["1"] + argv[8:] + ["--overwrite"]))
    few = np.load(run / "test_repr.npz")
    rows = [next(i for i in range(10) if np.array_equal(rep["z"][i], z)) for z in few["z"]]
    assert rows == sorted(rows) and np.array_equal(few["y"], rep["y"][rows])
    assert len(few["z"]) == 4 and set(few["y"].tolist()) == {0, 1}


def test_labels_in_memory_differ_by_seed_streamed_are_fixed(tiny_pythia, tiny_ckpt, tmp_path,
                                                            monkeypatch):
    argv = ["--ckpt", tiny_ckpt, "--n-labels", 30, *flags(tiny_pythia, tmp_path),
            "--batch-size", 10]                                      # 3 steps read all 30
    args = get_args(argv)
    spec = finetune.load_spec(args)

    def epoch(data, seed):  # the training stream, and (file, entry, label) of an epoch's jets
        train, *_ = finetune.seed_streams(args, spec, data, seed)
        rows = [tuple(s) + (l,) for b in common.loader(train, torch.device("cpu"))
                for s, l in zip(b["source"].tolist(), b["label"].tolist())]
        return train, rows

    data = finetune.open_data(args, spec)
    assert data["pool"] is not None and len(data["pool"]) == 80     # pool: min(80, 10 x 30)
    (ta, a), (tb, b) = epoch(data, 0), epoch(data, 1)
    assert sorted(r[2] for r in a) == sorted(r[2] for r in b) == [0] * 15 + [1] * 15
    assert not np.array_equal(ta.jets.p4, tb.jets.p4)                 # another subset per seed
    monkeypatch.setattr(finetune, "MAX_IN_MEMORY", 10)                # 30 labels now stream
    data = finetune.open_data(args, spec)
    assert data["pool"] is None and data["n_labels"] == 30
    (ta, a), (tb, b) = epoch(data, 0), epoch(data, 1)
    assert sorted(a) == sorted(b) and a != b                         # same jets, another order
    for f, e, label in a:                                           # the files' first 15 jets
        assert e < 15 and label == int("TTBar_" in ta.files[f].name), (ta.files[f], e, label)
    assert len(a) == 30
    results = finetune.main(args)
    assert results["labels"] == "stream" and results["n_train"] == 30
    workers = finetune.main(get_args(argv + ["--workers", 1, "--overwrite"]))
    assert workers["per_seed"] == results["per_seed"]               # loader workers: same batches


def test_scratch_size_without_ckpt(tiny_pythia, tmp_path, monkeypatch):
    monkeypatch.setitem(common.ENCODER_PRESETS, "small", common.EncoderConfig(**TINY))
    args = get_args(["--scratch", "--mode", "finetune", "--name", "s",
                     *flags(tiny_pythia, tmp_path)])
    results = finetune.main(args)
    assert results["method"] == "part" and results["args"]["size"] == "small"
    with pytest.raises(SystemExit):
        get_args(flags(tiny_pythia, tmp_path))             # neither --ckpt nor --scratch


def test_scratch_with_ckpt_uses_its_architecture_not_its_weights(tiny_ckpt):
    args = get_args(["--ckpt", tiny_ckpt, "--scratch"])
    spec = finetune.load_spec(args)
    assert spec["state"] is None and spec["cfg"]["dim"] == 16 and spec["features"] == "kin"
    assert finetune.load_spec(get_args(["--ckpt", tiny_ckpt]))["state"] is not None


class _Shifted(torch.nn.Module):
    """A stand-in encoder whose jet vector is offset + scale * z (z: the input itself)."""

    def __init__(self, offset, scale):
        super().__init__()
        self.offset, self.scale = offset, scale

    def forward(self, z):
        return z[:, None], torch.ones(len(z), 1, dtype=torch.bool), self.offset + self.scale * z


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_jet_vector_heads_do_not_see_a_common_offset_or_scale(head):
    """Issue 12 item 21: diffmae's pooled vectors share one large direction (cosine 0.995). The
    linear/mlp heads read the vector through a BatchNorm without affine parameters, so a common
    offset and scale change neither the logits nor the head's gradients, in training and, once
    precise_bn has set its statistics from the training vectors, in evaluation."""
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = (z[:, 0] > 0).long()
    out = []
    for offset, scale in ((0.0, 1.0), (10.0 + torch.arange(8.0), 0.5)):
        torch.manual_seed(0)
        clf = finetune.Classifier(_Shifted(offset, scale), head, 2, 8, 8, 1)
        logits, jet = clf(dict(z=z))
        clf.head[0].running_mean.copy_(jet.mean(0))                      # as precise_bn does
        clf.head[0].running_var.copy_(jet.var(0, unbiased=False))
        torch.nn.functional.cross_entropy(logits, y).backward()
        out.append((logits.detach(), [p.grad.clone() for p in clf.head.parameters()],
                    clf.eval()(dict(z=z))[0].detach()))
    (l0, g0, e0), (l1, g1, e1) = out
    torch.testing.assert_close(l0, l1, rtol=1e-3, atol=1e-3)  # float32 of the offset input
    torch.testing.assert_close(e0, e1, rtol=1e-3, atol=1e-3)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_precise_bn_statistics_at_every_evaluation(tiny_ckpt, tmp_path, monkeypatch):
    """Issue 19 item 2: at every validation (after steps 1, 2, ..., 20) and at the test, the
    linear head's eval-mode logits are those of the biased mean and variance of the training
    jets' vectors under the encoder as it is then, in eval mode (running averages lag)."""
    splits = synthetic_splits([0, 8], 32)                               # 64 training jets
    jets = splits["train"]
    batch = dict(x=torch.from_numpy(jets.x), p4=torch.from_numpy(jets.p4),
                 valid=torch.from_numpy(jets.valid))
    errors, predict = [], finetune.predict

    def spy(model, stream, s, spec, n_repr=0, split="test"):
        model.eval()
        with torch.no_grad():
            inputs = spec["module"].encoder_inputs(batch, spec["cfg"])
            z = model.encoder(**inputs)[2].double()                         # (64, C)
            norm, linear = model.head
            scaled = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + norm.eps)
            expected = scaled @ linear.weight.double().T + linear.bias.double()
            errors.append((model(inputs)[0].double() - expected).abs().max().item())
        return predict(model, stream, s, spec, n_repr, split)
    monkeypatch.setattr(finetune, "predict", spy)
    args = get_args(["--ckpt", tiny_ckpt, "--mode", "finetune", "--head", "linear", "--steps", 20,
                     "--eval-every", 1, "--batch-size", 16, "--lr", "1e-2", "--device", "cpu",
                     "--out", tmp_path])
    run, _ = one_seed(args, tmp_path, splits=splits)
    assert len(errors) == 21 and max(errors) < 1e-5, errors           # 20 validations, 1 test
    assert not same(encoder_state(run["model"]), common.load_checkpoint(tiny_ckpt)["encoder"])


def test_step_budget_and_equal_batches_at_100_labels(tmp_path, monkeypatch, capsys):
    """Issue 19 item 1: 100 labels train for --min-steps, not epochs x 1 step; every labelled
    jet is in every epoch, and the last batch is filled up to the same size."""
    splits = synthetic_splits([0, 8], 100)                             # 200 training jets
    args = get_args(["--scratch", "--n-labels", 100, "--min-steps", 12, "--epochs", 2,
                     "--batch-size", 32, "--device", "cpu", "--out", tmp_path, "--name", "b"])
    monkeypatch.setitem(common.ENCODER_PRESETS, "small", common.EncoderConfig(**TINY))
    spec = finetune.load_spec(args)
    data = finetune.open_data(args, spec, splits)
    train, _, _, n_train = finetune.seed_streams(args, spec, data, 0)
    batches = list(common.loader(train, torch.device("cpu")))
    seen = torch.cat([b["p4"].sum((1, 2)) for b in batches])
    assert n_train == 100 and [len(b["y"]) for b in batches] == [32] * 4   # 100 + 28 repeated
    assert len(torch.unique(seen)) == 100
    steps = []
    loss = finetune.selected_loss
    monkeypatch.setattr(finetune, "selected_loss", lambda *a: steps.append(1) or loss(*a))
    results = finetune.main(args, splits)
    assert len(steps) == results["steps"] == 12 >= 2 * len(batches)    # not 2 epochs x 4
    assert results["history"][0][-1]["step"] == 12 and results["n_train"] == 100
    assert "12 optimizer steps" in capsys.readouterr().out


def test_features_the_data_lacks_are_refused(tmp_path, capsys):
    """Issue 19 item 4: Top Tagging has no particle ID or impact parameters."""
    full = dict(TINY, in_dim=len(common.FEATURE_NAMES["full"]))
    encoder = common.Encoder(common.EncoderConfig(**full))
    path = tmp_path / "full.pt"
    common.save_checkpoint(path, method="part", args=dict(features="full"), model=encoder,
                           encoder=encoder, encoder_config=full)
    for argv in (["--ckpt", path], ["--scratch", "--features", "full"]):
        with pytest.raises(SystemExit) as e:
            finetune.load_spec(get_args([*argv, "--data", "toptagging"]))
        assert "--features kin" in str(e.value) and "\n" not in str(e.value)
    assert finetune.load_spec(get_args(["--ckpt", path, "--data", "pythia"]))["features"] == "full"


# --- the frozen-then-unfrozen schedule and the warm-up -------------------------------------------


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
    build = finetune.build_encoder
    monkeypatch.setattr(finetune.SHARED_ENCODER, "build_encoder",
                        lambda c: built.append(build(c)) or built[-1])
    lr_fn = finetune.backbone_lr

    def spy(step, head_lr, args):  # called at the start of each step: weights after step - 1
        snapshots.append({k: v.clone() for k, v in built[-1].state_dict().items()})
        return lr_fn(step, head_lr, args)
    monkeypatch.setattr(finetune, "backbone_lr", spy)
    args = get_args(["--ckpt", tiny_ckpt, "--mode", "finetune", "--schedule",
                     "frozen-then-unfrozen", "--freeze-steps", "4", "--ramp-steps", "2",
                     "--lr", "1e-2", *flags(tiny_pythia, tmp_path)])
    one_seed(args, tmp_path)
    start = common.load_checkpoint(tiny_ckpt)["encoder"]
    assert len(snapshots) == 10                                      # 80 jets / 16 x 2 epochs
    for step in range(5):                                            # after steps 0..3: frozen
        assert same(snapshots[step], start), step
    assert not same(snapshots[6], start)                             # joined at step 4
    assert not same(snapshots[-1], start)                            # and kept training


def test_warmup_default_fits_short_runs(tiny_pythia, tiny_ckpt, tmp_path):
    args = get_args(["--ckpt", tiny_ckpt, "--name", "w", *flags(tiny_pythia, tmp_path)[:-4],
                     "--device", "cpu"])
    assert args.warmup is None                                       # not 100 whatever the run
    results = finetune.main(args)
    assert results["steps"] == 10 and results["warmup"] == 1         # min(100, 5 % of 10 steps)
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] > 0.5 * args.lr                              # the peak was reached
    long = ["--mode", "finetune", "--schedule", "frozen-then-unfrozen", "--freeze-steps", 20]
    for extra in (["--warmup", 50], long):
        argv = ["--ckpt", tiny_ckpt, *flags(tiny_pythia, tmp_path)[:-4], *extra]
        with pytest.warns(UserWarning, match="--warmup|--freeze-steps"):
            one_seed(get_args(argv), tmp_path)


def test_schedulefree_validates_and_keeps_the_averaged_weights(tiny_pythia, tiny_ckpt, tmp_path,
                                                               monkeypatch):
    """--optimizer schedulefree: every validation pass (and the copy of the best weights) runs
    with the optimizer in eval mode, i.e. on the average x; training steps in train mode; the lr
    stays at its peak after the warm-up (no cosine)."""
    made, modes, lrs = [], [], []
    configure, predict, lr_at = common.configure_optimizer, finetune.predict, common.lr_at

    def spy_predict(*a, split="test", **kw):     # the optimizer's mode at each evaluation
        modes.append((split, made[0].param_groups[0]["train_mode"]))
        return predict(*a, split=split, **kw)
    monkeypatch.setattr(common, "configure_optimizer",
                        lambda *a, **kw: made.append(configure(*a, **kw)) or made[-1])
    monkeypatch.setattr(finetune, "predict", spy_predict)
    monkeypatch.setattr(common, "lr_at", lambda *a: lrs.append(lr_at(*a)) or lrs[-1])
    argv = ["--ckpt", tiny_ckpt, "--mode", "finetune", "--optimizer", "schedulefree",
            *flags(tiny_pythia, tmp_path)]
    run, _ = one_seed(get_args(argv), tmp_path)
    assert type(made[0]).__name__ == "AdamWScheduleFree" and made[0].param_groups[0]["k"] == 10
    assert modes[:2] == [("validation", False)] * 2 and np.isfinite(run["metrics"]["auc"])
    assert lrs[0] == 0.5e-3 and lrs[1:] == [1e-3] * 9                 # --warmup 2, then constant


# --- CWoLa ---------------------------------------------------------------------------------------


def test_cwola_mixture_counts():
    y = np.repeat([0, 1], [400, 100])
    idx, sample = finetune.cwola_mixture(y, 0.25, np.random.default_rng(0))
    assert len(set(idx)) == len(idx) == 400 and (sample == 0).sum() == (sample == 1).sum() == 200
    assert (y[idx[sample == 0]] == 0).all()                          # sample 0: pure QCD
    assert y[idx[sample == 1]].sum() == 50                           # sample 1: 25 % signal
    with pytest.raises(SystemExit, match="signal-frac"):
        finetune.cwola_mixture(y, 0.9, np.random.default_rng(0))     # 180 > 100 signal jets


def synthetic_jets(n_per_class, classes, seed, n=8, shift=1.5):
    """Separable jets: class c shifts the first feature of every particle by shift * c."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n_per_class)
    valid = np.arange(n)[None] < rng.integers(2, n + 1, len(y))[:, None]
    x = rng.normal(size=(len(y), n, 7)).astype(np.float32)
    x[..., 0] += shift * np.searchsorted(classes, y)[:, None]
    p4 = np.abs(rng.normal(size=(len(y), n, 4))).astype(np.float32) + 1.0
    p4[..., 3] = 3 * p4[..., :3].sum(-1)                             # E above |p|: massive
    x, p4 = x * valid[..., None], p4 * valid[..., None]
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64),
                       jet=np.zeros((len(y), 4), np.float32))


def synthetic_splits(classes, n_train, **kw):
    sizes, seeds = (dict(train=n_train, val=n_train // 2, test=n_train // 2),
                    dict(train=1, val=2, test=3))
    return {k: synthetic_jets(sizes[k], classes, seeds[k], **kw) for k in sizes}


FLAT = """
import torch.nn as nn
class Flat(nn.Module):  # no weights: the jet vector is every particle feature side by side
    def forward(self, x, valid):
        return x, valid, x.flatten(1)
def build_encoder(cfg):
    return Flat()
def encoder_inputs(batch, cfg):
    return dict(x=batch["x"], valid=batch["valid"])
def batch_transform(cfg):
    return None
"""


def register(tmp_path, monkeypatch, name, source):
    """A method module as the other scripts provide it, known to finetune.METHODS."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    monkeypatch.setitem(finetune.METHODS, name, module)
    return module


def test_cwola_needs_signal_to_learn(tmp_path, monkeypatch):
    """A linear probe on raw features (112 dims, the signal along one direction) keeps what a
    random classifier picks up by chance small, so S = 0 must land near AUC 0.5 on true labels."""
    flat = register(tmp_path, monkeypatch, "flatfeat", FLAT)
    common.save_checkpoint(tmp_path / "flat.pt", method="flatfeat", args={}, model=flat.Flat(),
                           encoder=flat.Flat(), encoder_config={})
    splits = synthetic_splits([0, 8], 1000, n=16, shift=0.7)
    auc = {}
    for frac in (0.0, 0.6):
        args = get_args(["--ckpt", tmp_path / "flat.pt", "--task", "cwola", "--signal-frac", frac,
                         "--seeds", 3, "--lr", "1e-2", "--epochs", 6, "--batch-size", 64,
                         "--n-max", 16, "--min-steps", 0, "--device", "cpu",
                         "--out", tmp_path])
        auc[frac] = [r["auc"] for r in finetune.main(args, splits)["per_seed"]]  # true labels
    assert all(abs(a - 0.5) < 0.1 for a in auc[0.0]), auc
    assert all(a > 0.75 for a in auc[0.6]), auc
    with pytest.raises(SystemExit):
        get_args(["--scratch", "--task", "cwola"])                        # no --signal-frac


# --- other data and other methods -------------------------------------------------------------


def test_multiclass_reports_one_vs_qcd(tiny_ckpt, tmp_path):
    args = get_args(["--ckpt", tiny_ckpt, "--head", "linear", "--epochs", "1", "--min-steps", 0,
                     "--batch-size", "32", "--device", "cpu", "--out", tmp_path])
    results = finetune.main(args, synthetic_splits([0, 1, 8], 64))
    assert results["classes"] == ["QCD", "Hbb", "Tbqq"]
    assert {"acc", "auc", "auc_Hbb", "auc_Tbqq", "rej50_Tbqq"} <= set(results["mean"])


TOYSSL = '''
import numpy as np, torch, torch.nn as nn
class Enc(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(3, width)
    def forward(self, feats, mask):                  # (B, S, 3), (B, S)
        tokens = self.lin(feats) * mask[..., None]
        return tokens, mask, tokens.sum(1)
def build_encoder(cfg):
    return Enc(cfg["width"])
def encoder_inputs(batch, cfg):                      # made by the worker transform below
    return dict(feats=batch["feats"], mask=batch["mask"])
def _transform(batch, slots):                        # numpy, in the loader worker
    x, valid = np.zeros((len(batch["x"]), slots, 3), np.float32), \
np.zeros((len(batch["x"]), slots), bool)
    n = min(slots, batch["x"].shape[1])
    x[:, :n], valid[:, :n] = batch["x"][:, :n, :3], batch["valid"][:, :n]
    return dict(batch, feats=x, mask=valid)
def batch_transform(cfg):
    import functools
    return functools.partial(_transform, slots=cfg["slots"])
'''


def test_checkpoint_of_another_method(tmp_path, monkeypatch):
    """A method with its own encoder, inputs and worker transform (like jjepa's subjets) is
    rebuilt through finetune.METHODS."""
    toy = register(tmp_path, monkeypatch, "toyssl", TOYSSL)
    enc = toy.build_encoder(dict(width=6))
    common.save_checkpoint(tmp_path / "toyssl.pt", method="toyssl", args={}, model=enc,
                           encoder=enc, encoder_config=dict(width=6, slots=5))
    for head in ("flatten", "cls-attn"):
        args = get_args(["--ckpt", tmp_path / "toyssl.pt", "--mode", "finetune", "--head", head,
                         "--epochs", "1", "--batch-size", "32", "--device", "cpu",
                         "--min-steps", 0, "--out", tmp_path])
        results = finetune.main(args, synthetic_splits([0, 8], 64))
        assert results["method"] == "toyssl" and 0 <= results["mean"]["auc"] <= 1
        assert np.load(tmp_path / results["name"] / "test_repr.npz")["z"].shape == (64, 6)
    common.save_checkpoint(tmp_path / "other.pt", method="nosuch", args={}, model=enc,
                           encoder=enc, encoder_config={})
    with pytest.raises(SystemExit, match="nosuch"):
        finetune.load_spec(get_args(["--ckpt", tmp_path / "other.pt"]))


# --- J-JEPA's jet selection: --min-subjets -----------------------------------------------------


def spread_jets(n_parts, seed, n=16):
    """Jets whose particles sit 0.5 apart in phi: C/A R=0.2 makes one subjet per particle."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 8], len(n_parts))
    counts = np.tile(n_parts, 2)
    valid = np.arange(n)[None] < counts[:, None]
    pt = np.linspace(100, 10, n)[None].repeat(len(y), 0)
    phi = 0.5 * np.arange(n)[None] + rng.uniform(0, 0.1, (len(y), 1))
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), 0 * pt, pt], -1).astype(np.float32)
    x = rng.normal(size=(len(y), n, 7)).astype(np.float32)
    x[..., 0] += (y == 8)[:, None]
    return common.Jets(x=x * valid[..., None], p4=p4 * valid[..., None], valid=valid,
                       y=y.astype(np.int64), jet=np.zeros((len(y), 4), np.float32))


def test_min_subjets_counts_subjets():
    jets = spread_jets([3, 9, 10, 12], seed=0)
    batch = dict(x=jets.x, p4=jets.p4, valid=jets.valid, y=jets.y)
    out = finetune.prepare_batch(dict(batch), np.array([0, 8]), 10, None)
    assert out["keep"].tolist() == [False, False, True, True] * 2
    assert out["label"].tolist() == [0] * 4 + [1] * 4
    assert finetune.prepare_batch(dict(batch), np.array([0, 8]), 0, None)["keep"].all()
    assert finetune.prepare_batch(dict(batch), np.array([0]), 0, None)["label"][-1] == -1


def test_min_subjets_leaves_other_jets_out_exactly(tiny_ckpt, tmp_path):
    """Jets below the cut change nothing: scrambling their features gives the same numbers,
    and only the selected jets are scored."""
    n_parts = np.tile([4, 12], 24)
    splits = {k: spread_jets(n_parts, seed) for k, seed in (("train", 1), ("val", 2), ("test", 3))}
    argv = ["--ckpt", tiny_ckpt, "--mode", "finetune", "--head", "mean", "--min-subjets", 10,
            "--epochs", 2, "--batch-size", 16, "--n-max", 16, "--min-steps", 0, "--device", "cpu",
            "--out", tmp_path]
    results = finetune.main(get_args(argv + ["--name", "a"]), splits)
    assert results["n_test"] == results["n_val"] == 48                # 12-subjet jets only
    assert len(np.load(tmp_path / "a" / "test_repr.npz")["y"]) == 48
    for jets in splits.values():
        few = jets.valid.sum(1) < 10
        jets.x[few] = (5 * np.random.default_rng(0).normal(size=jets.x[few].shape)
                       * jets.valid[few][..., None])
    again = finetune.main(get_args(argv + ["--name", "b"]), splits)
    assert again["per_seed"] == results["per_seed"] and again["history"] == results["history"]
    everything = finetune.main(get_args(argv[:6] + argv[8:] + ["--name", "c"]), splits)
    assert everything["n_test"] == 96 and everything["history"] != results["history"]


# --- bad input ---------------------------------------------------------------------------------


def test_nan_input_stops_without_results(tiny_ckpt, tmp_path):
    splits = synthetic_splits([0, 8], 64)
    splits["train"].x[5, 0, 0] = np.nan                               # one constituent
    args = get_args(["--ckpt", tiny_ckpt, "--n-labels", 128, "--batch-size", 128, "--name", "nan",
                     "--min-steps", 0, "--device", "cpu", "--out", tmp_path])
    with pytest.raises(SystemExit) as e:
        finetune.main(args, splits)
    assert isinstance(e.value.code, str) and "step 0" in e.value.code   # exit status 1
    assert "memory entry" in e.value.code                               # names the batch
    assert not (tmp_path / "nan" / "results.json").exists()
    assert not (tmp_path / "nan" / "test_repr.npz").exists()


@pytest.mark.parametrize("bad", [["--epochs", 0], ["--seeds", 0], ["--n-labels", 0],
                                 ["--n-labels", -3], ["--label-frac", 0], ["--label-frac", 1.5],
                                 ["--min-subjets", -1], ["--min-subjets", 21],
                                 ["--head-hidden", 0], ["--freeze-steps", -1],
                                 ["--label-smoothing", 1], ["--log-every", 0],
                                 ["--task", "cwola", "--signal-frac", 2]])
def test_bad_cli_values_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        get_args(["--scratch", *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and bad[-2] in err[-1], err                # one line, names the flag


def test_shared_encoder_pair():
    """finetune's build_encoder / encoder_inputs: the method-module interface of the shared
    ParT-lite encoder, which "part" and "scratch" map to (common imports no script)."""
    cfg = dict(in_dim=3, dim=8, heads=2, depth=1, cls_depth=1, pair_dim=())
    shared = finetune.SHARED_ENCODER
    enc = shared.build_encoder(cfg)
    assert isinstance(enc, common.Encoder)
    batch = dict(x=torch.zeros(2, 4, 3), valid=torch.ones(2, 4, dtype=torch.bool),
                 p4=torch.ones(2, 4, 4), y=torch.zeros(2))
    assert list(shared.encoder_inputs(batch)) == ["x", "valid", "p4"]
    assert enc(**shared.encoder_inputs(batch))[2].shape == (2, 8)
    args = finetune.get_args(["--scratch", "--size", "small"])
    assert finetune.load_spec(args)["module"] is shared
    import inspect
    assert "importlib" not in inspect.getsource(common)
