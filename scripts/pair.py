"""The paired difference between two fine-tuning cells, seed by seed.

study.py pairs each pretrained row with the scratch row of its own run. This pairs any two
finetune.py outputs that ran on the same labelled data and test jets: for example a pretrained
arm at one --backbone-lr-scale against scratch at another, from two study runs.

    python -m scripts.pair out/study_fresh_L1k/finetune/mpm_n10000_L1000 \
        out/study_fresh_L1k_swap/finetune/scratch_mpm_L1000

For each metric it prints the mean of A - B over the seeds both ran, its 95% t interval and
the paired t-test p (one comparison: no multiple-test correction). Seed k draws the same
labelled jets in both cells only if they share the data, label count and test set, so cells
that differ there are refused.
"""

import argparse
import json
from pathlib import Path

from scripts.study import by_seed, paired

SAME = ("data", "data_dir", "task", "n_labels", "label_frac", "signal_frac", "min_subjets",
        "n_val", "n_eval", "n_jets")  # what decides seed k's labelled, val and test jets
METRICS = ("auc", "acc", "rej50", "rej30", "sic")


def load(cell):
    path = Path(cell)
    path = path if path.name == "results.json" else path / "results.json"
    if not path.exists():
        raise SystemExit(f"pair: {path} not found; give a finetune.py output folder "
                         "(or its results.json)")
    r = json.loads(path.read_text())
    return r, {m: by_seed(r["per_seed"], r["seeds"], m) for m in METRICS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="finetune.py output folder (or results.json): the arm A")
    p.add_argument("b", help="the same for the arm B; the difference is A - B")
    args = p.parse_args(argv)
    (ra, a), (rb, b) = load(args.a), load(args.b)
    for key in SAME:
        if ra["args"].get(key) != rb["args"].get(key):
            raise SystemExit(f"pair: {args.a} and {args.b} differ in --{key.replace('_', '-')} "
                             f"({ra['args'].get(key)} against {rb['args'].get(key)}): their "
                             "seeds did not draw the same jets")
    seeds = sorted(set(ra["seeds"]) & set(rb["seeds"]))
    if not seeds:
        raise SystemExit(f"pair: {args.a} (seeds {ra['seeds']}) and {args.b} (seeds "
                         f"{rb['seeds']}) share no seed")
    differ = [f"{k} {ra['args'][k]} / {rb['args'][k]}" for k in sorted(ra["args"])
              if k not in ("ckpt", "out", "name", "seeds", "seed")
              and ra["args"][k] != rb["args"].get(k)]
    print(f"{ra['name']} - {rb['name']}, {ra['n_labels']} labels, seeds {seeds[0]}-{seeds[-1]} "
          f"({len(seeds)}); settings that differ: {', '.join(differ) or 'none'}")
    for m in METRICS:
        d = paired(a[m], b[m])
        print(f"  {m:5s} {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] p {d['p']:.2g} "
              f"(n {d['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
