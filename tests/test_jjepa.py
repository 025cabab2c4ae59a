"""jjepa.py: masking, leakage, EMA, padding, determinism, overfitting and the end-of-run probe.
Synthetic jets (1-prong vs 3-prong) stand in for the data: fast, and trivially separable."""
import json
import math

import numpy as np
import pytest
import torch

import common
import jjepa

TINY = ["--n-jets", "128", "--n-eval", "64", "--epochs", "2", "--batch-size", "32",
        "--dim", "32", "--depth", "2", "--heads", "4", "--pred-dim", "16", "--pred-depth", "1",
        "--warmup", "2", "--probe-jets", "128", "--eval-every", "4", "--device", "cpu",
        "--no-compile"]


def make_jets(n, seed, n_max=32):
    """Half 1-prong (y=0), half 3-prong (y=1) jets; prongs 0.4 apart in (eta, phi), so C/A
    R=0.2 finds them as separate subjets. Built with the data layer's own feature recipe."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    n_prongs = np.where(y == 1, 3, 1)
    eta0, phi0 = rng.uniform(-1.5, 1.5, n), rng.uniform(-np.pi, np.pi, n)
    prong = rng.integers(0, 3, (n, n_max)) % n_prongs[:, None]  # prong of each particle
    angle = 2 * np.pi * prong / 3 + rng.uniform(0, 2 * np.pi, (n, 1))
    eta = eta0[:, None] + 0.4 * np.cos(angle) * (n_prongs[:, None] > 1) + rng.normal(0, 0.03, (n, n_max))
    phi = phi0[:, None] + 0.4 * np.sin(angle) * (n_prongs[:, None] > 1) + rng.normal(0, 0.03, (n, n_max))
    pt = np.sort(rng.exponential(20.0, (n, n_max)) + 1.0, axis=1)[:, ::-1]
    counts = rng.integers(n_max // 2, n_max + 1, n)
    valid = np.arange(n_max) < counts[:, None]
    p4 = np.stack([pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), pt * np.cosh(eta)], -1)
    p4 = (p4 * valid[..., None]).astype(np.float32)
    s = p4.sum(1)
    jpt = np.hypot(s[:, 0], s[:, 1])
    jet = np.stack([jpt, np.arcsinh(s[:, 2] / jpt), np.arctan2(s[:, 1], s[:, 0]), s[:, 3]], -1)
    deta = common.signed_deta(eta, jet[:, 1:2])
    dphi = common.wrap_phi(phi - jet[:, 2:3])
    x = common.particle_features(p4, valid, jet.astype(np.float32), deta, dphi)
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64), jet=jet.astype(np.float32))


@pytest.fixture(scope="module", autouse=True)
def tmp_cache(tmp_path_factory):
    """The subjet cache of these tests goes to a temporary folder, not data/cache."""
    tmp = tmp_path_factory.mktemp("jjepa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOJET_CACHE", str(tmp / "cache"))
        yield tmp


@pytest.fixture(scope="module")
def synthetic(tmp_cache):
    """train() reads these jets instead of files."""
    data = {"train": make_jets(256, 0), "val": make_jets(128, 1), "test": make_jets(64, 2)}

    def load_jets(source, path=None, split="train", n_jets=None, n_max=128, **kw):
        return data[split][:n_jets]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "load_jets", load_jets)
        yield tmp_cache


@pytest.fixture(scope="module")
def tiny_run(synthetic):
    """One tiny run (2 epochs x 4 steps, checkpoint at every epoch), shared by several tests."""
    return jjepa.train(jjepa.get_args(TINY + ["--out", str(synthetic / "tiny")]))


def tiny_cfg(sel="attn"):
    args = jjepa.get_args(TINY + ["--sel", sel])
    return jjepa.encoder_config(args, in_dim=7)


def tensors(jets, cfg):
    return {k: torch.from_numpy(v) for k, v in jjepa.encoder_inputs(jets, cfg).items()}


def test_targets_are_nonempty_with_right_count():
    gen = torch.Generator().manual_seed(0)
    n = torch.arange(21).repeat(10)  # every count of non-empty subjets, 0..20
    nonempty = torch.arange(20) < n[:, None]
    nonempty = nonempty[:, torch.randperm(20, generator=gen)]  # empties anywhere, not only last
    K = 6
    tgt_idx, tgt_valid, context = jjepa.sample_targets(nonempty, 0.3, K, gen)
    expected = torch.clamp(torch.minimum(torch.floor(0.3 * n + 0.5).clamp(min=1), n - 1), min=0)
    assert torch.equal(tgt_valid.sum(1), expected)
    chosen = torch.gather(nonempty, 1, tgt_idx)
    assert chosen[tgt_valid].all(), "a target slot points at an empty subjet"
    assert (context.sum(1) == n - expected).all()
    assert (context.sum(1)[n > 0] >= 1).all(), "a jet lost its whole context"
    target = torch.zeros_like(nonempty).scatter_(1, tgt_idx, tgt_valid)
    assert not (target & context).any()
    # the draw varies between jets with the same subjets (not one fixed pattern)
    assert len({tuple(r.tolist()) for r in tgt_idx[n == 20]}) > 1


def test_context_never_sees_targets():
    """Perturbing target subjets' particles must leave every context token unchanged."""
    torch.manual_seed(0)
    cfg = tiny_cfg("attn")
    enc = jjepa.build_encoder(cfg).eval()
    inp = tensors(make_jets(16, 3), cfg)
    nonempty = (inp["idx"] >= 0).any(-1)
    tgt_idx, tgt_valid, context = jjepa.sample_targets(nonempty, 0.3, 6, torch.Generator().manual_seed(1))
    target = torch.zeros_like(nonempty).scatter_(1, tgt_idx, tgt_valid)
    assert target.any()
    # particles belonging to target subjets, and the targets' positions, get scrambled
    x2, pos2 = inp["x"].clone(), inp["pos"].clone()
    for b, s in target.nonzero().tolist():
        p = inp["idx"][b, s]
        x2[b, p[p >= 0].long()] += 5 * torch.randn(int((p >= 0).sum()), x2.shape[-1])
    pos2[target] += 3.0
    with torch.no_grad():
        a, va, _ = enc(inp["x"], inp["idx"], inp["pos"], keep=context)
        b, vb, _ = enc(x2, inp["idx"], pos2, keep=context)
        full_a = enc(inp["x"], inp["idx"], inp["pos"])[0]
        full_b = enc(x2, inp["idx"], pos2)[0]
    assert torch.equal(va, context) and torch.equal(vb, context)
    assert torch.equal(a[context], b[context])
    assert not torch.allclose(full_a[context], full_b[context]), "perturbation had no effect at all"


def test_ema_update_exact():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    m = jjepa.ema_momentum(3, 10, 0.996)
    assert m == pytest.approx(1 - 0.004 * (math.cos(math.pi * 0.3) + 1) / 2, abs=1e-15)
    assert jjepa.ema_momentum(0, 10, 0.996) == pytest.approx(0.996)
    assert jjepa.ema_momentum(10, 10, 0.996) == 1.0
    jjepa.ema_update(target, online, m)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, m * b + (1 - m) * o, rtol=0, atol=1e-7)


@pytest.mark.parametrize("sel", ["mlp", "attn"])
def test_all_padded_subjets_finite(sel):
    torch.manual_seed(0)
    cfg = tiny_cfg(sel)
    enc = jjepa.build_encoder(cfg)
    inp = tensors(make_jets(4, 4), cfg)
    inp["idx"][0] = -1  # a jet with no particle at all
    assert (inp["idx"][1:] == -1).all(-1).any(), "fixture should also have empty subjets"
    tokens, valid, jet = enc(**inp)
    assert torch.isfinite(tokens).all() and torch.isfinite(jet).all()
    assert not valid[0].any() and (tokens[~valid] == 0).all()
    jet.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


def test_bitwise_determinism(synthetic, tiny_run):
    again = jjepa.train(jjepa.get_args(TINY + ["--out", str(synthetic / "again")]))
    timing = ("jets_per_s",)
    assert {k: v for k, v in again.items() if k not in timing} == \
        {k: v for k, v in tiny_run.items() if k not in timing}  # losses, diagnostics, probe
    wa = torch.load(synthetic / "tiny" / "jjepa.pt", weights_only=True)["model"]
    wb = torch.load(synthetic / "again" / "jjepa.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_matches_uninterrupted(synthetic, tiny_run, monkeypatch):
    save = common.save_checkpoint

    def save_then_crash(*a, **kw):  # the run dies right after its first checkpoint (step 4)
        save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    cut = TINY + ["--out", str(synthetic / "cut")]
    with pytest.raises(KeyboardInterrupt):
        jjepa.train(jjepa.get_args(cut))
    monkeypatch.setattr(common, "save_checkpoint", save)
    ckpt = str(synthetic / "cut" / "jjepa.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = jjepa.train(jjepa.get_args(cut + ["--resume", ckpt]))
    assert resumed["loss"] == tiny_run["loss"] and resumed["val_loss"] == tiny_run["val_loss"]
    wa = torch.load(synthetic / "tiny" / "jjepa.pt", weights_only=True)["model"]
    wb = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tiny_run_overfits(synthetic):
    """30 steps on the same 32 jets: the prediction loss falls far below its early value."""
    out = synthetic / "overfit"
    jjepa.train(jjepa.get_args(TINY + ["--n-jets", "32", "--epochs", "30", "--lr", "3e-3",
                                       "--eval-every", "10", "--probe-jets", "0", "--out", str(out)]))
    log = [json.loads(line) for line in open(out / "jjepa.jsonl")]
    assert log[-1]["step"] == 30
    # about 1.4 at step 1 (target outputs are layer-normed: unit scale), 0.36 at step 10
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and log[-1]["loss"] < 0.2


def test_probe_beats_chance(tiny_run):
    """1-prong vs 3-prong: even a briefly trained encoder separates them."""
    assert tiny_run["probe_acc"] > 0.8 and tiny_run["probe_auc"] > 0.9
    assert 0.0 < tiny_run["cos"] < 1.0 and tiny_run["std"] > 0


def test_loss_flags_change_the_loss():
    """--loss smooth-l1 and the optional variance/covariance terms are wired in (not ignored)."""
    cfg = tiny_cfg("mlp")
    inp = tensors(make_jets(32, 5), cfg)
    tgt_idx, tgt_valid, context = jjepa.sample_targets((inp["idx"] >= 0).any(-1), 0.3, 6,
                                                       torch.Generator().manual_seed(0))
    losses = {}
    for name, kw in {"mse": {}, "smooth-l1": dict(loss="smooth-l1"),
                     "var": dict(var_weight=1.0), "cov": dict(cov_weight=1.0)}.items():
        torch.manual_seed(0)
        model = jjepa.JJEPA(cfg, 16, 1, 4, **kw)
        losses[name] = model(**inp, tgt_idx=tgt_idx, tgt_valid=tgt_valid, context=context).item()
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["smooth-l1"] < losses["mse"]  # |e| < 1 mostly: 0.5 e^2 < e^2
    assert losses["var"] > losses["mse"] and losses["cov"] > losses["mse"]
