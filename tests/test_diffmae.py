import math
import types

import pytest
import torch
import torch.nn.functional as F

import diffmae

TINY = ["--preset", "tiny", "--epochs", "2", "--batch-size", "16", "--n-jets", "48", "--n-max", "64", "--diff-mul", "2",
        "--probe-jets", "48", "--n-eval", "32", "--device", "cpu", "--no-compile"]


def fake_jets(B=6, N=24, F_=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([N, N - 3, 17, 9, 2, 0][:B])
    valid = torch.arange(N)[None] < n[:, None]
    x = torch.randn(B, N, F_, generator=g) * valid[..., None]
    return types.SimpleNamespace(x=x.numpy(), valid=valid.numpy())


def tiny_model(head="diffusion", **kw):
    args = types.SimpleNamespace(preset="tiny", n_max=24, feature_mix=kw.get("feature_mix", False),
                                 head=head, diff_steps=1000, attn="gqa", features="full")
    torch.manual_seed(0)
    return diffmae.DiffMAE(diffmae.encoder_config(args, 17), args)


def batch(jets, args, mask_seed=0, noise_seed=0):
    x, valid = torch.as_tensor(jets.x), torch.as_tensor(jets.valid)
    return diffmae.make_batch(x, valid, args, torch.Generator().manual_seed(mask_seed),
                              torch.Generator().manual_seed(noise_seed), "cpu")


def batch_args(**kw):
    return types.SimpleNamespace(mask_ratio=kw.get("mask_ratio", 0.25), pred_ratio=kw.get("pred_ratio", "0.25"),
                                 diff_steps=1000, diff_mul=3)


def test_gqa_equals_mha_with_repeated_kv():
    torch.manual_seed(0)
    att = diffmae.Attention(32, 4, 2, "gqa")
    x, mem = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    valid = torch.rand(3, 7) > 0.3
    valid[:, 0] = True
    # full multi-head attention written out, with group g's K/V copied to query heads 2g, 2g+1
    q = att.q(x).view(3, 5, 4, 8).transpose(1, 2)
    k, v = att.kv(mem).view(3, 7, 2, 2, 8).permute(2, 0, 3, 1, 4)
    k, v = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    ref = att.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 32))
    mask = diffmae.key_mask(valid)
    torch.testing.assert_close(att(x, mem, mask), ref, rtol=1e-5, atol=1e-6)
    att.attn = "expand"
    torch.testing.assert_close(att(x, mem, mask), ref, rtol=1e-5, atol=1e-6)


def test_masks_disjoint_and_sized():
    valid = torch.from_numpy(fake_jets().valid)
    vis_idx, vis_valid, pred_idx, pred_valid = diffmae.make_masks(valid, 0.25, "1tok", torch.Generator().manual_seed(0))
    n = valid.sum(1)
    assert vis_valid.sum(1).tolist() == [18, 16, 13, 7, 1, 0]       # n - round(0.25 n), >= 1 hidden
    assert pred_valid.sum(1).tolist() == [1, 1, 1, 1, 1, 0]
    for b in range(len(n)):
        seen, pred = set(vis_idx[b][vis_valid[b]].tolist()), set(pred_idx[b][pred_valid[b]].tolist())
        assert not seen & pred and all(i < n[b] for i in seen | pred)


def test_encoder_never_sees_masked_particles():
    jets, args, model = fake_jets(), batch_args(), tiny_model()
    b1 = batch(jets, args, 1)
    hidden = torch.ones(jets.valid.shape, dtype=torch.bool)
    # everything not visible (hidden particles and padding) is replaced by large numbers
    vis_idx, vis_valid, _, _ = diffmae.make_masks(torch.from_numpy(jets.valid), 0.25, "0.25",
                                                  torch.Generator().manual_seed(1))
    for row in range(6):
        hidden[row, vis_idx[row][vis_valid[row]]] = False
    jets2 = types.SimpleNamespace(x=jets.x.copy(), valid=jets.valid)
    jets2.x[hidden.numpy()] = 100.0
    b2 = batch(jets2, args, 1)
    enc = lambda b: model.encoder(b["x_vis"], b["vis_valid"])[0][b["vis_valid"]]
    torch.testing.assert_close(enc(b1), enc(b2), rtol=0, atol=0)
    assert not torch.equal(b1["x_pred"], b2["x_pred"])              # the targets did change
    jets2.x[0, vis_idx[0, 0]] += 1.0                                # a visible particle does matter
    b3 = batch(jets2, args, 1)
    assert not torch.allclose(enc(b1), enc(b3))


@pytest.mark.parametrize("feature_mix", [False, True])
def test_decoder_queries_do_not_attend_to_each_other(feature_mix):
    model = tiny_model(feature_mix=feature_mix)
    torch.manual_seed(1)
    x, valid = torch.randn(2, 10, 17), torch.ones(2, 10, dtype=torch.bool)
    rank = torch.tensor([[1, 4, 7], [2, 3, 9]])
    z1 = model.condition(x, valid, rank)
    rank2 = rank.clone()
    rank2[:, 0] = 0
    z2 = model.condition(x, valid, rank2)
    torch.testing.assert_close(z1[:, 1:], z2[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(z1[:, 0], z2[:, 0])


def test_diffusion_loss_hand_computed():
    ab = diffmae.cosine_alpha_bar(1000)
    x0 = torch.tensor([[[1.0, -2.0]], [[0.5, 0.0]]])                  # (B=2, P=1, F=2)
    z = torch.zeros(2, 1, 3)
    valid = torch.tensor([[True], [False]])                          # second jet's token ignored
    t = torch.tensor([[[0, 999]], [[500, 500]]])                    # (B, P, M=2)
    noise = torch.tensor([[[[0.3, 0.1], [-1.0, 2.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    net = lambda xt, t_, z_: 0.5 * xt                               # a fixed, known predictor
    # by hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps ; loss = mean over the 2 draws x 2 features
    total = 0.0
    for m, tt in enumerate([0, 999]):
        a = float(ab[tt])
        for f in range(2):
            xt = math.sqrt(a) * float(x0[0, 0, f]) + math.sqrt(1 - a) * float(noise[0, 0, m, f])
            total += (0.5 * xt - float(noise[0, 0, m, f])) ** 2
    got = diffmae.diffusion_loss(net, x0, z, valid, t, noise, ab)
    assert abs(float(got) - total / 4) < 1e-5
    # the zero-initialised MLP predicts eps = 0, so its loss is the mean squared noise
    mlp = tiny_model().diff
    zc = torch.randn(2, 1, 32)
    with torch.no_grad():
        got = diffmae.diffusion_loss(mlp, torch.randn(2, 1, 17), zc, valid, t, torch.ones(2, 1, 2, 17) * 0.7, ab)
    assert abs(got.item() - 0.49) < 1e-6


def test_sampler_recovers_gaussian_with_true_noise_predictor():
    ab = diffmae.cosine_alpha_bar(1000)
    mu, sig = torch.tensor([1.5, -2.0, 0.0]), torch.tensor([0.5, 2.0, 1.0])

    def net(x, t, z):                                               # E[eps | x_t] for x0 ~ N(mu, sig^2)
        a = ab[t][..., None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * sig ** 2 + 1 - a)
    s = diffmae.ddpm_sample(net, torch.zeros(8000, 1), 3, ab, steps=100, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean(0), mu, atol=0.06, rtol=0)
    torch.testing.assert_close(s.std(0), sig, rtol=0.05, atol=0)
    cold = diffmae.ddpm_sample(net, torch.zeros(100, 1), 3, ab, steps=100, temperature=0.0)
    assert float(cold.std(0).max()) < 1e-3                          # temperature scales only the noise
    # an untrained (eps = 0) predictor explodes by 1/sqrt(alpha_bar) ~ 1e4 unless x0 is clipped
    zero = lambda x, t, z: torch.zeros_like(x)
    assert float(diffmae.ddpm_sample(zero, torch.zeros(50, 1), 3, ab).abs().max()) > 1e3
    assert float(diffmae.ddpm_sample(zero, torch.zeros(50, 1), 3, ab, clip=5.0).abs().max()) < 6


def test_all_padded_rows_finite():
    model = tiny_model()
    x = torch.full((2, 16, 17), float("nan"))
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[1, :3] = True
    x[1, :3] = torch.randn(3, 17)
    tokens, _, jet = model.encoder(x, valid)
    assert torch.isfinite(tokens).all() and torch.isfinite(jet).all() and (jet[0] == 0).all()
    jets = types.SimpleNamespace(x=x.nan_to_num().numpy(), valid=valid.numpy())
    b = batch(jets, batch_args())
    loss = model(**b)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("head", ["diffusion", "mse"])
def test_overfits_one_batch(head):
    model = tiny_model(head)
    jets = fake_jets()
    b = batch(jets, batch_args())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = model(**b).item()
    for _ in range(40):
        loss = model(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.15 * first


def run(tmp_path, data, *extra):
    return diffmae.train(diffmae.get_args(TINY + ["--data", "pythia", "--data-dir", str(data),
                                                  "--out", str(tmp_path)] + list(extra)))


def test_tiny_run_bitwise_deterministic_and_checkpoint(tmp_path, tiny_pythia):
    import common
    r1 = run(tmp_path / "a", tiny_pythia, "--feature-mix", "--eval-every", "3")
    r2 = run(tmp_path / "b", tiny_pythia, "--feature-mix", "--eval-every", "3")
    assert r1 == r2 and math.isfinite(r1["loss"]) and 0 <= r1["probe_acc"] <= 1
    c1, c2 = (common.load_checkpoint(tmp_path / d / "diffmae.pt") for d in "ab")
    assert all(torch.equal(c1["model"][k], c2["model"][k]) for k in c1["model"])
    # finetune.py rebuilds the encoder from the checkpoint alone
    enc = common.build_encoder(c1["method"], c1["encoder_config"])
    enc.load_state_dict(c1["encoder"])
    jets = common.load_jets("pythia", tiny_pythia, split="val", n_max=64, features="full")
    x, valid = torch.from_numpy(jets.x[:4].copy()), torch.from_numpy(jets.valid[:4].copy())
    tokens, tok_valid, jet = enc(x, valid)
    assert tokens.shape[:2] == tok_valid.shape and jet.shape == (4, 32) and torch.isfinite(jet).all()


def test_resume_equals_uninterrupted(tmp_path, tiny_pythia):
    import common
    full = run(tmp_path / "full", tiny_pythia, "--epochs", "2")
    run(tmp_path / "half", tiny_pythia, "--epochs", "1")
    resumed = run(tmp_path / "half", tiny_pythia, "--epochs", "2", "--resume", str(tmp_path / "half" / "diffmae.pt"))
    assert resumed["loss"] == full["loss"] and resumed["val_loss"] == full["val_loss"]
    a, b = (common.load_checkpoint(tmp_path / d / "diffmae.pt")["model"] for d in ("full", "half"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedulefree_switches_to_eval_weights(tmp_path, tiny_pythia):
    pytest.importorskip("schedulefree")
    import common
    r = run(tmp_path, tiny_pythia, "--optimizer", "schedulefree", "--head", "mse")
    assert math.isfinite(r["loss"])
    ckpt = common.load_checkpoint(tmp_path / "diffmae.pt")
    # saved in eval mode: the optimizer state says so and the weights are the averaged x sequence
    assert all(not g["train_mode"] for g in ckpt["optimizer"]["param_groups"])


def test_no_graph_breaks():
    model, b = tiny_model(), batch(fake_jets(), batch_args())
    explained = torch._dynamo.explain(model)(**b)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
