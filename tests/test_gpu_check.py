"""scripts/gpu_check.py: a run cut short still prints its table from what its sections wrote
(the sections themselves run in `python -m scripts.gpu_check --device cpu`, too slow here)."""
import json

from scripts import gpu_check


def test_table_of_a_cut_run(tmp_path):
    args = gpu_check.get_args(["--device", "cpu", "--out", str(tmp_path)])
    (tmp_path / "data.json").write_text(json.dumps(dict(generated=80, jets_per_s=12.0,
                                                        data_dir="d")))
    (tmp_path / "jetclr.json").write_text(json.dumps(dict(
        jets_per_s=1500.0, step_jets_per_s=2000.0, data_ms=2.5, step_ms=8.0, peak_gib=None,
        graphs=2, graph_breaks=0)))                  # cut before the loader's figure
    (tmp_path / "part.json").write_text(json.dumps(dict(weaver=True, ratio_compiled=1.25, rows=[
        dict(model="nanojet Encoder", compiled=True, jets_per_s=5000.0, ms_per_step=100.0,
             peak_gib=3.0)])))
    statuses = dict(data=dict(status="ok"), jetclr=dict(status="cut at 35 s"),
                    mpm=dict(status="failed (rc 1)"), part=dict(status="ok"))
    lines = gpu_check.table(args, statuses).splitlines()
    assert lines[2].split()[:4] == ["jetclr", "cut", "at", "35"] and "1,500" in lines[2]
    assert lines[2].split()[-6:] == ["-", "2.5", "8.0", "-", "2", "0"]  # loader, peak: none
    assert lines[3].split() == ["mpm", "failed", "(rc", "1)"] + ["-"] * 8
    assert "ours / weaver jets/s (compiled) = 1.25" in lines[-1]
