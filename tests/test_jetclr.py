"""JetCLR: augmentation invariants, the loss against a naive loop, determinism, a tiny run."""
import math
import shutil

import numpy as np
import pytest
import torch

import common
import jetclr

NO_AUG = dict(rotate=False, translate=0.0, smear=0.0, split=0.0)


def fake_batch(seed=0, B=8, N=32):
    """Jets at varied (eta, phi), including one with no free slot and one with a single particle."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([3, 10, N, 20, 1, 15, 7, 28])[:B]
    valid = torch.arange(N)[None] < n[:, None]
    pt = 0.05 + 50 * torch.rand(B, N, generator=g) ** 3  # down to 50 MeV: smearing must stay finite
    eta = torch.linspace(-2, 2, B)[:, None] + 0.3 * torch.randn(B, N, generator=g)
    phi = torch.linspace(-3, 3, B)[:, None] + 0.3 * torch.randn(B, N, generator=g)
    m = 0.14 * torch.ones(B, N)
    p4 = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta),
                      torch.sqrt(m ** 2 + (pt * torch.cosh(eta)) ** 2)], -1)
    return p4 * valid[..., None], valid


def pt_of(p4):
    return torch.hypot(p4[..., 0], p4[..., 1])


def test_rotation_and_translation_keep_pt():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    for kw in (dict(NO_AUG, rotate=True), dict(NO_AUG, translate=1.0)):
        out, v = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(1), **kw)
        assert torch.equal(v, valid)
        torch.testing.assert_close(pt_of(out), pt_of(p4), rtol=1e-5, atol=1e-5)  # each particle
        torch.testing.assert_close(pt_of(out).sum(1), pt_of(p4).sum(1), rtol=1e-5, atol=1e-4)
        assert (out - p4).abs().max() > 1e-2  # the augmentation did move something
    # a translation moves every particle by the same (deta, dphi): the jet's vector pT is kept too
    out, _ = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(2), **dict(NO_AUG, translate=1.0))
    torch.testing.assert_close(pt_of(out.sum(1)), pt_of(p4.sum(1)), rtol=1e-5, atol=1e-3)
    # a rotation keeps each particle's distance to the jet axis
    dist = lambda q: (lambda c: torch.hypot(c[..., 1], c[..., 2]))(jetclr.to_centred(q, valid, axis))  # noqa: E731
    out, _ = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(3), **dict(NO_AUG, rotate=True))
    torch.testing.assert_close(dist(out), dist(p4), rtol=1e-4, atol=1e-4)


def test_smearing_keeps_pt_and_stays_finite():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    out, v = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(1), **dict(NO_AUG, smear=0.1))
    assert torch.equal(v, valid) and torch.isfinite(out).all()
    torch.testing.assert_close(pt_of(out), pt_of(p4), rtol=1e-5, atol=1e-5)
    # soft particles move more than hard ones (width 0.1 GeV / pT)
    c0, c1 = jetclr.to_centred(p4, valid, axis), jetclr.to_centred(out, valid, axis)
    shift = (c1[..., 1] - c0[..., 1]).abs()
    soft, hard = valid & (pt_of(p4) < 1), valid & (pt_of(p4) > 20)
    assert shift[soft].mean() > 10 * shift[hard].mean()


def test_collinear_split_keeps_four_momentum_and_adds_one_slot_per_split():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    out, v = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(1), **dict(NO_AUG, split=0.5))
    torch.testing.assert_close(out.sum(1), p4.sum(1), rtol=1e-5, atol=2e-3)
    # every split leaves a lighter parent in its slot and puts one child into a free slot
    parents = valid & (pt_of(out) < pt_of(p4) * (1 - 1e-6))
    assert parents.sum() > 0
    assert torch.equal(v.sum(1) - valid.sum(1), parents.sum(1))
    assert (v & ~valid).sum(1).le((~valid).sum(1)).all()  # never beyond n_max
    assert torch.equal(v[:, :1], valid[:, :1]) and (v | ~valid).all()
    # valid-first order survives (the encoder's trimming relies on it)
    n = v.sum(1, keepdim=True)
    assert torch.equal(v, torch.arange(v.shape[1])[None] < n)
    # split everything: each jet doubles, or fills up when there are fewer free slots
    out, v = jetclr.augment(p4, valid, axis, torch.Generator().manual_seed(2), **dict(NO_AUG, split=1.0))
    assert torch.equal(v.sum(1), torch.minimum(2 * valid.sum(1), torch.tensor(valid.shape[1])))
    torch.testing.assert_close(out.sum(1), p4.sum(1), rtol=1e-5, atol=2e-3)
    # a child is collinear with its parent: same direction, so the jet's particle directions
    # after the split are a subset of those before
    c = jetclr.to_centred(out, v, axis)
    c0 = jetclr.to_centred(p4, valid, axis)
    for b in range(len(v)):
        before = c0[b, valid[b], 1:3]
        after = c[b, v[b], 1:3]
        d = torch.cdist(after, before).amin(1)
        assert d.max() < 2e-3  # fp32 round trip through (px, py, pz, E)


def test_padding_never_becomes_a_particle():
    p4, valid = fake_batch()
    axis = jetclr.jet_axis(p4, valid)
    # garbage in the padding must neither leak out nor be moved into the jet
    dirty = torch.where(valid[..., None], p4, torch.full_like(p4, 7.0))
    gen = torch.Generator().manual_seed(4)
    out, v = jetclr.augment(dirty, valid, axis, gen, rotate=True, translate=1.0, smear=0.1, split=0.0)
    assert torch.equal(v, valid)
    assert (out[~valid] == 0).all()
    out, v = jetclr.augment(p4, valid, axis, gen, rotate=True, translate=1.0, smear=0.1, split=0.5)
    assert (out[~v] == 0).all() and (pt_of(out)[v] > 0).all()
    assert v[2].all() and torch.equal(v[2], valid[2])  # a full jet has no slot to split into
    # a jet's translation range comes from its particles alone: a single particle is not moved
    c0, c1 = jetclr.to_centred(p4, valid, axis), jetclr.to_centred(
        jetclr.augment(p4, valid, axis, gen, **dict(NO_AUG, translate=1.0))[0], valid, axis)
    torch.testing.assert_close(c1[4, 0], c0[4, 0], rtol=1e-5, atol=1e-5)


def test_features_match_common_recipe_on_unaugmented_jets(toptagging_fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path))
    jets = common.load_jets("toptagging", toptagging_fixture, "train", n_jets=64)
    p4, valid = torch.from_numpy(np.array(jets.p4)), torch.from_numpy(np.array(jets.valid))
    f = jetclr.kin_features(p4, valid).numpy()
    # same standardisation as common's reader; small differences come from the jet axis
    # (sum of the kept particles here, the file's jet branches there)
    assert np.abs(f - jets.x)[jets.valid].mean() < 0.02
    assert (f[~jets.valid] == 0).all()


def test_nt_xent_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    t = 0.1
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(10) if k != i)
        total += -math.log(num / den)
    assert jetclr.nt_xent(z1, z2, t).item() == pytest.approx(total / 10, rel=1e-5)


def test_tiny_model_overfits_one_batch():
    p4, valid = fake_batch(N=16)
    args = jetclr.get_args(["--dim", "16", "--depth", "1", "--heads", "2", "--cls-depth", "1"])
    torch.manual_seed(0)
    model = jetclr.JetCLR(jetclr.encoder_config(args), 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    views = jetclr.two_views(p4, valid, torch.Generator().manual_seed(0), args)
    losses = []
    for _ in range(60):
        z = model(*views)[1]
        loss = jetclr.nt_xent(z[:8], z[8:], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0 and losses[-1] < 0.3 * losses[0]


TINY = ["--data", "toptagging", "--epochs", "2", "--batch-size", "32", "--dim", "16", "--depth",
        "1", "--heads", "2", "--cls-depth", "1", "--n-eval", "128", "--warmup", "2", "--device", "cpu",
        "--n-jets", "128"]


@pytest.fixture
def tiny_args(toptagging_fixture, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))
    return lambda out, *extra: jetclr.get_args(TINY + ["--data-dir", str(toptagging_fixture),
                                                       "--out", str(tmp_path / out), *extra])


def test_tiny_run_is_bitwise_deterministic_and_loads_for_finetuning(tiny_args, tmp_path):
    r1 = jetclr.train(tiny_args("a", "--no-lct"))
    r2 = jetclr.train(tiny_args("b", "--no-lct"))
    assert np.isfinite(r1["loss"]) and r1["loss"] == r2["loss"]
    a, b = (common.load_checkpoint(tmp_path / d / "jetclr.pt") for d in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # finetune.py's path: rebuild the encoder from the checkpoint and feed it the default inputs
    enc = common.build_encoder(a["method"], a["encoder_config"])
    enc.load_state_dict(a["encoder"])
    jets = common.load_jets("toptagging", tiny_args("c").data_dir, "val", n_jets=16)
    inputs = common.encoder_inputs(a["method"], jets, a["encoder_config"])
    tokens, tok_valid, jet = enc(**{k: torch.from_numpy(np.array(v)) for k, v in inputs.items()})
    assert jet.shape == (len(jets), 16) and torch.isfinite(tokens).all()


def test_resume_continues_bit_for_bit(tiny_args, tmp_path, monkeypatch):
    # keep the checkpoint written after the first epoch, then resume from it
    save = common.save_checkpoint

    def keep_first(path, **kw):
        save(path, **kw)
        if kw["step"] == 4:
            shutil.copy(path, tmp_path / "epoch1.pt")

    monkeypatch.setattr(common, "save_checkpoint", keep_first)
    full = jetclr.train(tiny_args("full", "--no-lct"))
    resumed = jetclr.train(tiny_args("res", "--no-lct", "--resume", str(tmp_path / "epoch1.pt")))
    assert full["loss"] == resumed["loss"]


def test_tiny_run_learns_and_reports_lct(tiny_args):
    r = jetclr.train(tiny_args("lct", "--epochs", "3", "--n-jets", "256", "--n-eval", "256",
                               "--profile", "--pooling", "ptsum"))
    assert r["loss"] < math.log(63)  # chance level for 2 x 32 views
    assert 0.5 < r["lct_repr_auc"] <= 1 and 0.5 < r["lct_head1_auc"] <= 1
    assert r["ms_aug"] > 0 and r["ms_step"] > 0


def test_bad_flags_fail_clearly():
    with pytest.raises(SystemExit):
        jetclr.get_args(["--split-prob", "1.5"])
    with pytest.raises(SystemExit):
        jetclr.get_args(["--scaling", "100,abc"])


def test_scaling_study_writes_table_and_plot(tiny_args, tmp_path):
    r = jetclr.train(tiny_args("scal", "--epochs", "1", "--no-lct", "--scaling", "64,128",
                               "--scaling-labels", "100", "--scaling-finetune-epochs", "1"))
    assert [row["n"] for row in r["rows"]] == [0, 64, 128]
    assert all(0 <= row["ft_auc"] <= 1 for row in r["rows"])
    assert (tmp_path / "scal" / "jetclr_scaling.png").stat().st_size > 1000
