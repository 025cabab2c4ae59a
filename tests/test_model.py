"""Encoder invariances, pair features, trimming, compile-cleanliness and ROC metrics."""
import math

import numpy as np
import pytest
import torch

import common
import helpers


def make_batch(lengths, n=48, in_dim=7, seed=0):
    ("""Synthetic jets, valid-first and pT-sorted; padding filled with garbage (even NaN) on """
     """purpose.""")
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    pt = torch.rand(B, n, generator=g).mul(100).add(1).sort(dim=1, descending=True).values
    eta, phi = 0.3 * torch.randn(B, n, generator=g), 0.3 * torch.randn(B, n, generator=g)
    p4 = torch.stack([pt * phi.cos(), pt * phi.sin(), pt * eta.sinh(), pt * eta.cosh()], -1)
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    x = torch.randn(B, n, in_dim, generator=g)
    x[~valid], p4[~valid] = float("nan"), 7.0
    return x, valid, p4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return common.Encoder(common.ENCODER_PRESETS["small"]).eval()


def test_permutation(model):
    x, valid, p4 = make_batch([30, 11], n=32)
    perm = torch.randperm(32)
    t1, _, j1 = model(x, valid, p4)
    t2, _, j2 = model(x[:, perm], valid[:, perm], p4[:, perm])
    torch.testing.assert_close(t2, t1[:, perm], atol=1e-5, rtol=1e-4)  # tokens equivariant
    torch.testing.assert_close(j2, j1, atol=1e-5, rtol=1e-4)           # jet invariant
    assert not torch.allclose(j1[0], j1[1], atol=1e-3)                 # and not trivially constant


def test_extra_padding(model):
    x, valid, p4 = make_batch([14, 9], n=48)
    t16, _, j16 = model(x[:, :16], valid[:, :16], p4[:, :16])
    t48, _, j48 = model(x, valid, p4)
    torch.testing.assert_close(j48, j16, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t48[:, :16], t16, atol=1e-5, rtol=1e-4)
    assert (t48[:, 16:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_padded_finite(dtype):
    torch.manual_seed(0)
    model = common.Encoder(common.ENCODER_PRESETS["small"])
    x, valid, p4 = make_batch([0, 5], n=16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        tokens, _, jet = model(x, valid, p4)
    assert torch.isfinite(tokens).all() and torch.isfinite(jet).all()
    jet.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_no_pair_bias():
    cfg = common.EncoderConfig(dim=32, heads=2, depth=1, cls_depth=1, pair_dim=())
    x, valid, _ = make_batch([0, 5], n=16)
    tokens, _, jet = common.Encoder(cfg)(x, valid)  # p4 not needed
    assert jet.shape == (2, 32) and torch.isfinite(jet).all()


def test_pair_features_by_hand():
    # a: pT 10 along x, y = 0; b: pT 5 at phi 0.3, rapidity 0.4 (both massless); c: padding
    a = [10.0, 0.0, 0.0, 10.0]
    b = [5 * math.cos(0.3), 5 * math.sin(0.3), 5 * math.sinh(0.4), 5 * math.cosh(0.4)]
    p4 = torch.tensor([[a, b, [1.0, 2.0, 3.0, 4.0]]])
    f = helpers.pair_features(p4, torch.tensor([[True, True, False]]))
    delta = 0.5                                                   # sqrt(0.4^2 + 0.3^2)
    m2 = 2 * 10 * 5 * (math.cosh(0.4) - math.cos(0.3))             # massless pair mass
    want = torch.tensor([math.log(delta), math.log(5 * delta), math.log(5 / 15), math.log(m2)])
    torch.testing.assert_close(f[0, 0, 1], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f[0, 1, 0], want, atol=1e-5, rtol=1e-5)
    assert (f[0, 2] == 0).all() and (f[0, :, 2] == 0).all()
    assert torch.isfinite(f).all()  # diagonal: Delta = 0 and m = 0 are clamped before the log
    # phi wraps: the same pair rotated across +-pi has the same features
    rot = torch.tensor([[a, b]]) @ torch.tensor(
        [[math.cos(3.0), math.sin(3.0), 0, 0], [-math.sin(3.0), math.cos(3.0), 0, 0],
         [0, 0, 1, 0], [0, 0, 0, 1]])
    both = torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(helpers.pair_features(rot, both)[0, 0, 1],
                               want, atol=1e-4, rtol=1e-4)


def test_trim_batch():
    x, valid, p4 = make_batch([5, 20, 0], n=48)
    v, xt, pt = common.trim_batch(valid, x, p4)
    assert v.shape == (3, 32) and xt.shape == (3, 32, 7) and pt.shape == (3, 32, 4)
    assert common.trim_batch(valid[[2]])[0].shape == (1, 16)   # all padded: keep one bucket
    assert common.trim_batch(valid, multiple=64)[0].shape == (3, 48)  # never longer than N


def test_no_graph_breaks():
    torch._dynamo.reset()
    cfg = common.EncoderConfig(dim=16, heads=2, depth=1, cls_depth=1, pair_dim=(8,),
                               embed_hidden=())
    x, valid, p4 = make_batch([5, 16], n=16)
    explain = torch._dynamo.explain(common.Encoder(cfg))(x, valid, p4)
    assert explain.graph_break_count == 0, explain.break_reasons


# --- metrics --------------------------------------------------------------------
def test_metrics_perfect_and_inverse():
    y = [0, 0, 1, 1]
    m = common.roc_metrics(y, [0.1, 0.2, 0.8, 0.9])
    assert np.isnan(m.pop("sic"))                                  # 2 background jets, not 10
    assert m == dict(acc=1.0, auc=1.0, rej50=float("inf"), rej30=float("inf"))  # eps_B = 0
    m = common.roc_metrics(y, [0.9, 0.8, 0.2, 0.1])
    m.pop("sic")
    # every background jet passes before the first signal jet: eps_B = 1 at any eps_S > 0
    assert m == dict(acc=0.0, auc=0.0, rej50=1.0, rej30=1.0)


def test_significance_by_hand():
    """sic = max eps_S / sqrt(eps_B) over thresholds that >= 10 background jets pass."""
    sig = [0.95, 0.9, 0.6, 0.2]
    # 10 background jets at 0.7: points (eps_S, eps_B) = (.5, .5), (.75, .5), (1, .5), (1, 1)
    m = common.roc_metrics([1] * 4 + [0] * 20, sig + [0.7] * 10 + [0.1] * 10)
    assert m["sic"] == pytest.approx(1 / 0.5 ** 0.5)               # eps_S 1 at eps_B 0.5
    # 9 at 0.85: every point with eps_B = 0.45 is set by 9 jets; only (1, 1) counts
    m = common.roc_metrics([1] * 4 + [0] * 20, sig + [0.85] * 9 + [0.1] * 11)
    assert m["sic"] == pytest.approx(1.0)


def test_metrics_ties():
    m = common.roc_metrics([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    # one tie group: the ROC is the diagonal, eps_B = eps_S; 0.5 is not > 0.5 -> all predicted 0
    assert m["auc"] == 0.5 and m["acc"] == 0.5
    assert m["rej50"] == pytest.approx(2.0) and m["rej30"] == pytest.approx(1 / 0.3)


def test_metrics_interpolation():
    # descending: 0.9 (S) -> (eps_B 0, eps_S 1/3); tie 0.5 (S, B) -> (1, 2/3); 0.2 (S) -> (1, 1)
    m = common.roc_metrics([0, 1, 1, 1], [0.5, 0.5, 0.9, 0.2])
    # vs the B jet: S 0.5 ties (1/2), 0.9 wins, 0.2 loses
    assert m["auc"] == pytest.approx(0.5)
    assert m["acc"] == 0.5                      # predictions 0, 0, 1, 0
    assert m["rej50"] == pytest.approx(2.0)     # halfway along (0, 1/3) -> (1, 2/3): eps_B = 0.5
    assert m["rej30"] == float("inf")           # on the segment (0, 0) -> (0, 1/3)


def test_metrics_two_column_and_bruteforce_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300) / 10 + 0.05 * y * rng.integers(0, 2, 300)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert common.roc_metrics(y, s)["auc"] == pytest.approx(brute, abs=1e-12)
    two = np.stack([1 - s, s], 1)
    assert common.roc_metrics(y, two)["auc"] == pytest.approx(brute, abs=1e-12)


def test_metrics_multiclass():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1],     # QCD
                  [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],     # class 1: well separated from QCD
                  [0.7, 0.0, 0.3], [0.9, 0.0, 0.1]])    # class 2: looks more QCD than QCD
    m = common.roc_metrics(y, p)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["per_class"][1]["auc"] == 1.0 and m["per_class"][1]["rej50"] == float("inf")
    # P2/(P2+P0): QCD 0.111, 0.143; class 2 0.3, 0.1 -> pairs won 1, 1, 0, 0 -> 0.5
    assert m["per_class"][2]["auc"] == pytest.approx(0.5)
    assert m["auc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="probabilities"):
        common.roc_metrics(y, p - 0.5)


def test_pair_bias_triangle_matches_full(model):
    # the encoder embeds only pairs i <= j; the result must equal embedding the full square
    x, valid, p4 = make_batch([20, 7], n=32)
    p4 = torch.where(valid[..., None], p4, 0.0)
    full = model.pair_embed(helpers.pair_features(p4, valid))                # (B, N, N, H)
    torch.testing.assert_close(model.pair_bias(p4, valid), full, atol=1e-5, rtol=1e-5)


def test_bench_smoke():
    from scripts import bench_train
    rows = bench_train.main(bench_train.get_args(
        ["--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0",
         "--size", "small", "--no-weaver", "--no-compile"]))
    assert len(rows) == 1 and rows[0][4] > 0


def test_no_class_blocks_gives_masked_mean_and_no_unused_parameters():
    """cls_depth=0 (e.g. JetCLR's pT-weighted pooling): the jet vector is the masked mean of the
    tokens, and every parameter gets a gradient (DDP would stall on unused ones)."""
    cfg = common.EncoderConfig(in_dim=3, dim=16, heads=2, depth=1, cls_depth=0, pair_dim=())
    enc = common.Encoder(cfg)
    x, valid = torch.randn(3, 8, 3), torch.arange(8)[None] < torch.tensor([[8], [3], [1]])
    tokens, _, jet = enc(x, valid)
    expect = (tokens * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    torch.testing.assert_close(jet, expect)
    jet.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
