"""The GPU path, as far as a CPU can prove it (issue 22): every method trains a few steps under
bf16 autocast (the code path CUDA's `s.ctx` takes) with finite losses that stay fp32, and a
compiled model's graphs stay within its length buckets, with no fallback to eager."""
import functools

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

import common
import diffmae
import jetclr
import jjepa
import mpm

CPU = torch.device("cpu")
SMALL = ["--steps", "2", "--batch-size", "16", "--n-jets", "32", "--n-eval", "16", "--n-max", "32",
         "--device", "cpu", "--no-compile", "--log-every", "50"]
METHODS = {
    "jjepa": (jjepa, ["--dim", "16", "--depth", "1", "--heads", "2", "--pred-dim", "16",
                      "--pred-depth", "1"]),
    "jetclr": (jetclr, ["--dim", "16", "--depth", "1", "--heads", "2"]),
    "mpm": (mpm, ["--dim", "16", "--depth", "1", "--heads", "2", "--n-registers", "1",
                  "--dec-dim", "16", "--dec-depth", "1", "--dec-heads", "2", "--k", "8",
                  "--kmeans-jets", "32", "--kmeans-steps", "2"]),
    "diffmae": (diffmae, ["--size", "tiny", "--diff-mul", "2"]),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_autocast_steps(name, tiny_pythia, tmp_path, monkeypatch):
    module, flags = METHODS[name]
    setup = common.setup

    def bf16_setup(args):
        s = setup(args)
        s.ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        return s
    monkeypatch.setattr(common, "setup", bf16_setup)
    seen = dict(bf16=0, losses=[])

    def watch(module_, inputs, output):
        first = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(first) and first.dtype == torch.bfloat16:
            seen["bf16"] += 1
        if torch.is_tensor(first) and first.dim() == 0 and first.requires_grad:
            seen["losses"].append(first)  # a module that returns the training loss
    if name == "jetclr":  # its loss is a function: NT-Xent, documented fp32
        nt_xent = jetclr.nt_xent
        monkeypatch.setattr(jetclr, "nt_xent", lambda *a, **k: seen["losses"].append(
            nt_xent(*a, **k)) or seen["losses"][-1])
    hook = register_module_forward_hook(watch)
    try:
        module.train(module.get_args(SMALL + flags + ["--data-dir", str(tiny_pythia),
                                                      "--out", str(tmp_path)]))
    finally:
        hook.remove()
    assert seen["bf16"] > 0                                   # autocast did run in bf16
    assert seen["losses"] and all(l.dtype == torch.float32 and torch.isfinite(l)
                                  for l in seen["losses"])


def test_compiled_steps_stay_in_their_buckets(monkeypatch):
    """The shared encoder at n_max 48 (trim_batch's buckets 16, 32, 48), trained through
    common.wrap_model on batches of every bucket: at most one graph per bucket, every frame
    compiled (none left to eager), no graph break; dynamo raises instead of silently running
    eager if the recompile limit is hit. backend="eager": dynamo's part only, fast on a CPU."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    cfg = common.EncoderConfig(in_dim=7, dim=16, heads=2, depth=1, cls_depth=1, pair_dim=(),
                               mlp_ratio=2, embed_hidden=())
    raw = common.Encoder(cfg)
    model = common.wrap_model(raw, common.Setup(CPU, "cpu", None, compile=True))
    g = torch.Generator().manual_seed(0)
    for n in (48, 10, 30, 47, 16):                            # longest jet of each batch
        valid = torch.arange(48)[None] < torch.randint(1, n + 1, (4,), generator=g)[:, None]
        valid[0, :n] = True
        p4 = torch.rand(4, 48, 4, generator=g) * valid[..., None]
        x = torch.randn(4, 48, 7, generator=g) * valid[..., None]
        valid, x, p4 = common.trim_batch(valid, x, p4)
        model(x, valid, p4)[2].pow(2).mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["ok"] == counters["frames"]["total"] >= 1, dict(counters["frames"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    torch._dynamo.reset()
