"""bench_train.py --method: the global hooks split a method's own training loop into data and
step time (no timing is asserted: only what was counted)."""
import math

import torch

from scripts import bench_train


def test_step_clock_pairs_forwards_with_steps():
    """One start per optimizer step (the first forward after the previous step), whatever other
    forward calls the step makes; setup forwards before the first step only move start 0."""
    clock = bench_train.StepClock(lambda: None)
    hooks = [bench_train.register_module_forward_pre_hook(clock.forward_pre),
             bench_train.register_optimizer_step_post_hook(clock.step_post)]
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.zeros(1, 3))  # setup forward
        for _ in range(4):
            model(torch.randn(2, 3)).sum().backward()  # three module forwards per step
            opt.step()
            opt.zero_grad()
    finally:
        for h in hooks:
            h.remove()
    assert len(clock.ends) == 4 and len(clock.starts) == 4
    assert all(s <= e for s, e in zip(clock.starts, clock.ends))
    assert all(e <= s for e, s in zip(clock.ends, clock.starts[1:]))


def test_bench_method_jetclr(tiny_pythia10, capsys):
    args = bench_train.get_args(["--method", "jetclr", "--data-dir", str(tiny_pythia10),
                                 "--device", "cpu", "--batch-size", "8", "--steps", "3",
                                 "--warmup", "1", "--n-eval", "8",
                                 "--method-args", "--dim 16 --depth 1 --cls-depth 1 --heads 2"])
    r = bench_train.bench_method(args)
    assert all(math.isfinite(v) and v > 0 for v in r.values())
    out = capsys.readouterr().out
    assert "1 warm-up + 3 timed steps" in out and "jets per CPU-second" in out
