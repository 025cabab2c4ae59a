"""mpm.py: masking, the two input styles, K-means targets, determinism and a tiny overfit.
Training runs read synthetic jets (common.load_jets patched), so the file runs in seconds."""
import shutil

import numpy as np
import pytest
import torch

import common
import mpm

N_MAX = 24
TINY = ["--n-jets", "96", "--n-eval", "48", "--n-max", str(N_MAX), "--epochs", "2",
        "--batch-size", "32", "--dim", "16", "--depth", "1", "--heads", "2", "--n-registers", "1",
        "--dec-dim", "16", "--dec-depth", "1", "--dec-heads", "2", "--k", "8",
        "--kmeans-particles", "500", "--kmeans-steps", "5", "--kmeans-batch", "128",
        "--probe-jets", "64", "--probe-steps", "20", "--warmup", "2", "--device", "cpu"]


def fake_jets(n, n_max=N_MAX, features="full", seed=0):
    """Jets with the "full" (or "kin") column layout: PID one-hot, charge, IPs, pT-sorted."""
    rng = np.random.default_rng(seed)
    F = len(common.FEATURE_NAMES[features])
    counts = rng.integers(2, n_max + 1, n)
    valid = np.arange(n_max)[None] < counts[:, None]
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, n_max, F)).astype(np.float32)
    x[..., 0] = -np.sort(-rng.normal(size=(n, n_max)), 1) + y[:, None]  # pt_log, descending
    if features == "full":
        kind = rng.integers(0, 5, (n, n_max))
        x[..., 6:11] = np.eye(5, dtype=np.float32)[kind]
        charged = (kind == 0) | (kind >= 3)
        x[..., 5] = np.where(charged, rng.choice([-1.0, 1.0], (n, n_max)), 0.0)
    x[~valid] = 0.0
    p4 = np.abs(rng.normal(size=(n, n_max, 4))).astype(np.float32)
    p4[..., 3] += 3.0
    p4[~valid] = 0.0
    return common.Jets(x=x, p4=p4, valid=valid, y=y.astype(np.int64),
                       jet=np.zeros((n, 4), np.float32))


@pytest.fixture
def fake_data(monkeypatch, tmp_path):
    def load_jets(source, path=None, split="train", n_jets=None, n_max=128, features="kin", **kw):
        return fake_jets(n_jets or 64, n_max, features, seed={"train": 0, "val": 1}[split])
    monkeypatch.setattr(common, "load_jets", load_jets)
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))
    return tmp_path


def batch_of(jets):
    return dict(x=torch.from_numpy(jets.x), valid=torch.from_numpy(jets.valid),
                p4=torch.from_numpy(jets.p4))


def tiny_model(style, target="kmeans", pair_bias=False, seed=0):
    args = mpm.get_args(TINY + ["--style", style, "--target", target]
                        + (["--pair-bias"] if pair_bias else []))
    cfg = dict(features="full", input_cols=mpm.input_cols("full"), dim=16, heads=2, depth=1,
               pair_dim=[8] if pair_bias else [], mlp_ratio=2, dropout=0.0, n_registers=1,
               jet_repr="cls", mask_token=style == "bert")
    torch.manual_seed(seed)
    fit = dict(centroids=torch.randn(8, 7), mean=torch.zeros(7), std=torch.ones(7))
    return mpm.MPM(args, cfg, fit).eval(), args


# --- masking ------------------------------------------------------------------------------------

@pytest.mark.parametrize("frac", [0.05, 0.4, 0.95])
def test_mask_never_padding_and_keeps_one_of_each(frac):
    valid = torch.from_numpy(fake_jets(300).valid)
    mask = mpm.make_mask(valid, frac, torch.Generator().manual_seed(0))
    n, n_mask = valid.sum(1), mask.sum(1)
    assert not (mask & ~valid).any()
    assert (n_mask >= 1).all() and (n - n_mask >= 1).all()
    expected = torch.minimum((frac * n.double()).floor().long().clamp(min=1), n - 1)
    assert torch.equal(n_mask, expected)
    again = mpm.make_mask(valid, frac, torch.Generator().manual_seed(0))
    other = mpm.make_mask(valid, frac, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_split_lists_masked_particles_in_pt_order():
    jets = fake_jets(50)
    b = batch_of(jets)
    mask = mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0))
    for style in ("mae", "bert"):
        s = mpm.split_batch(b, mask, style)
        for i in range(50):
            want = b["x"][i][mask[i]]                           # masked rows, original (pT) order
            assert torch.equal(s["x_m"][i][s["valid_m"][i]], want)
    s = mpm.split_batch(b, mask, "mae")
    for i in range(50):
        assert torch.equal(s["x"][i][s["valid"][i]], b["x"][i][b["valid"][i] & ~mask[i]])


# --- no leakage, no rank at the input -----------------------------------------------------------

@pytest.mark.parametrize("pair_bias", [False, True])
def test_mae_encoder_never_sees_masked_particles(pair_bias):
    model, _ = tiny_model("mae", pair_bias=pair_bias)
    b = batch_of(fake_jets(16))
    mask = mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0))
    changed = {k: v.clone() for k, v in b.items()}
    changed["x"][mask] = torch.randn(int(mask.sum()), changed["x"].shape[-1]) * 5
    changed["p4"][mask] = torch.rand(int(mask.sum()), 4) * 50
    s1, s2 = mpm.split_batch(b, mask, "mae"), mpm.split_batch(changed, mask, "mae")
    with torch.no_grad():
        out1 = model.encoder(s1["x"], s1["valid"], s1["p4"])
        out2 = model.encoder(s2["x"], s2["valid"], s2["p4"])
        assert all(torch.equal(a, c) for a, c in zip(out1, out2))
        assert torch.equal(model.predict(s1), model.predict(s2))
        assert not torch.equal(model.targets(s1["x_m"])[0], model.targets(s2["x_m"])[0])


@pytest.mark.parametrize("pair_bias", [False, True])
def test_bert_input_carries_no_rank_and_no_masked_features(pair_bias):
    model, _ = tiny_model("bert", pair_bias=pair_bias)
    b = batch_of(fake_jets(16))
    mask = mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0))
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    changed = {k: v.clone() for k, v in b.items()}
    changed["x"][mask] = torch.randn(int(mask.sum()), changed["x"].shape[-1]) * 5
    changed["p4"][mask] = torch.rand(int(mask.sum()), 4) * 50
    with torch.no_grad():
        out1 = model.encoder(b["x"], b["valid"], b["p4"], mask=mask)
        out2 = model.encoder(changed["x"], changed["valid"], changed["p4"], mask=mask)
    R = model.encoder.registers.shape[1]
    first_input = seen[0][:, R:]                                   # (B, N, C) after registers
    # every masked slot holds the very same vector: no rank, no feature, no ID
    assert torch.equal(first_input[mask], model.encoder.mask_token.expand(int(mask.sum()), -1))
    assert all(torch.equal(a, c) for a, c in zip(out1, out2))


def test_null_tokens_differ_only_by_rank():
    model, _ = tiny_model("mae")
    b1, b2 = batch_of(fake_jets(8, seed=3)), batch_of(fake_jets(8, seed=4))
    M = 5
    valid_m = torch.ones(8, M, dtype=torch.bool)
    with torch.no_grad():
        h1, _ = model.decoder_input(*model.encoder(b1["x"], b1["valid"], b1["p4"]), valid_m)
        h2, _ = model.decoder_input(*model.encoder(b2["x"], b2["valid"], b2["p4"]), valid_m)
    q1, q2 = h1[:, -M:], h2[:, -M:]
    assert torch.equal(q1, q2)                                     # nothing from the jet
    assert torch.equal(q1, model.null[:M].expand(8, M, -1))        # query k = learned vector k
    assert len({tuple(r.tolist()) for r in q1[0]}) == M            # and ranks differ


# --- targets ------------------------------------------------------------------------------------

def test_kmeans_assign_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    points, centroids = torch.randn(700, 7, generator=g, dtype=torch.float64), \
        torch.randn(33, 7, generator=g, dtype=torch.float64)
    brute = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(mpm.kmeans_assign(points, centroids, chunk=64), brute)


def test_kmeans_fit_finds_blobs_and_never_uses_padding():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat(300, 1) + 0.1 * torch.randn(900, 2, generator=g)
    fitted = mpm.fit_kmeans(points, 3, 20, 128, torch.Generator().manual_seed(1))
    found = fitted[mpm.kmeans_assign(centres, fitted)]
    assert torch.allclose(found, centres, atol=0.05)
    # the sample comes from real particles only: garbage in padding changes nothing
    jets = fake_jets(40)
    dirty = fake_jets(40)
    dirty.x[~dirty.valid] = 1e6
    a = mpm.kmeans_sample(jets, "full", 10**6, torch.Generator().manual_seed(0))
    c = mpm.kmeans_sample(dirty, "full", 10**6, torch.Generator().manual_seed(0))
    assert torch.equal(a, c) and len(a) == jets.valid.sum() and a.abs().max() < 100


def test_neutral_impact_parameters_are_not_targets():
    x = torch.zeros(2, 17)
    x[:, 11:15] = 0.7                                   # an IP value on both
    x[0, 5], x[0, 6] = 1.0, 1.0                         # charged hadron
    x[1, 8] = 1.0                                       # photon
    t = mpm.raw_targets(x, "full")
    assert torch.equal(t[0, 1:5], torch.full((4,), 0.7)) and torch.equal(t[1, 1:5], torch.zeros(4))
    assert mpm.pid_class(x).tolist() == [2, 0]


# --- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("style,target", [("mae", "kmeans"), ("bert", "regress")])
def test_tiny_model_overfits_one_batch(style, target):
    model, _ = tiny_model(style, target)
    model.train()
    b = batch_of(fake_jets(16))
    mask = mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0))
    s = mpm.split_batch(b, mask, style)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss, stats = model(s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(stats["target_loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.4 * losses[0]
    if target == "kmeans":  # label smoothing keeps the loss above 0; the argmax is exact
        assert float(stats["token_acc"]) == 1.0


def test_same_seed_runs_are_bitwise_equal_and_resume_continues_exactly(fake_data, monkeypatch):
    real_save = common.save_checkpoint

    def save_and_keep_step3(path, **kw):  # keep the mid-run checkpoint (after epoch 1 of 2)
        real_save(path, **kw)
        if kw["step"] == 3 and not (fake_data / "step3.pt").exists():
            shutil.copy(path, fake_data / "step3.pt")

    monkeypatch.setattr(common, "save_checkpoint", save_and_keep_step3)
    out = []
    resume = ["--resume", str(fake_data / "step3.pt")]
    for run, extra in (("a", []), ("b", []), ("resumed", resume)):
        args = mpm.get_args(TINY + ["--out", str(fake_data / run)] + extra)
        out.append((mpm.train(args), torch.load(fake_data / run / "mpm.pt", weights_only=True)))
    (r1, c1), (r2, c2), (r3, c3) = out
    assert c1["step"] == 6 and c3["step"] == 6
    for r, c in ((r2, c2), (r3, c3)):
        assert r1["loss"] == r["loss"] and r1["val"] == r["val"] and r1["probe"] == r["probe"]
        assert all(torch.equal(c1["model"][k], c["model"][k]) for k in c1["model"])
    cached = list((fake_data / "cache").glob("mpm_kmeans_*.pt"))
    assert len(cached) == 1
    assert torch.equal(torch.load(cached[0])["centroids"], c1["kmeans"]["centroids"])
    assert torch.equal(c1["model"]["centroids"], c1["kmeans"]["centroids"])
    # finetune.py's path: rebuild the encoder from the checkpoint alone
    enc = common.build_encoder(c1["method"], c1["encoder_config"])
    enc.load_state_dict(c1["encoder"])
    b = batch_of(fake_jets(4))
    tokens, valid, jet = enc(**b)
    assert tokens.shape[:2] == valid.shape and jet.shape == (4, 16) and torch.isfinite(jet).all()


@pytest.mark.parametrize("style", ["mae", "bert"])
def test_forward_compiles_without_graph_breaks(style):
    model, _ = tiny_model(style, pair_bias=True)
    b = batch_of(fake_jets(8))
    s = mpm.split_batch(b, mpm.make_mask(b["valid"], 0.4, torch.Generator().manual_seed(0)), style)
    explained = torch._dynamo.explain(model)(s)
    assert explained.graph_break_count == 0, explained.break_reasons
