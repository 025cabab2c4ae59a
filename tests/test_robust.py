"""Bad input (issue 14): each test is one case that used to train to NaN, crash with a raw
traceback or leave a broken state behind, numbered as in the issue."""
import argparse
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import awkward as ak
import numpy as np
import pytest
import torch
import torch.nn as nn
import uproot

import common
from scripts import download
from test_data import random_jets, write_jetclass, write_toptagging


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOJET_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def two_files(tmp_path, n=20):
    write_jetclass(tmp_path / "d/train/TTBar_000.root", random_jets(n, 1), "Tbqq")
    write_jetclass(tmp_path / "d/train/ZJetsToNuNu_000.root", random_jets(n, 2), "QCD")
    return tmp_path / "d"


# --- 1. huge finite values: dropped at the reader, and training stops on NaN -------------------

def test_unphysical_constituents_dropped_and_counted(tmp_path):
    jets = random_jets(40, 3, n_lo=20, n_hi=30)
    jets[0]["px"][0] = 1e20                          # |p| above 100 TeV
    jets[1]["energy"][0] = 1e30                      # E above 100 TeV
    jets[2]["energy"][1] = -5.0                      # E < 0
    jets[3]["energy"][2] = 0.5 * np.hypot(jets[3]["px"][2], jets[3]["py"][2])  # E < |p|
    jets[4]["px"][3] = np.nan
    write_jetclass(tmp_path / "d/train/TTBar_000.root", jets, "Tbqq")
    with pytest.warns(UserWarning, match=r"dropped 5 constituents with NaN/inf or unphysical "
                                         r"values \(4 unphysical"):
        j = common.load_jets("pythia", tmp_path / "d", cache=False)
    assert len(j) == 40 and np.abs(j.p4).max() < 1e5 and np.isfinite(j.x).all()
    n = np.array([len(jt["px"]) for jt in jets])
    assert j.valid.sum() == n.sum() - 5
    # massless constituents (E == |p| up to float32 rounding) are all kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = common.load_jets("pythia", two_files(tmp_path / "clean"), cache=False)
    assert clean.valid.sum() > 0


def test_mostly_bad_file_is_rejected_by_name(tmp_path):
    jets = random_jets(10, 4, n_lo=10, n_hi=11)
    for jt in jets[:3]:                              # 30% of the constituents
        jt["energy"] = np.full(len(jt["px"]), 1e20)
    write_jetclass(tmp_path / "d/train/HToBB_000.root", jets, "Hbb")
    with pytest.raises(SystemExit, match=r"HToBB_000.root.*30 of 100 constituents"):
        common.load_jets("pythia", tmp_path / "d", cache=False)
    h5 = write_toptagging(tmp_path / "bad.h5", np.full((4, 2, 4), 1e25), [0, 1, 0, 1])
    with pytest.raises(SystemExit, match="bad.h5"):
        common.load_jets("toptagging", h5, cache=False)


def test_check_finite_names_step_and_source():
    common.check_finite(torch.tensor(0.5), 3, "pythia train", grad_norm=torch.tensor(2.0))
    with pytest.raises(SystemExit, match=r"step 7: loss nan .*pythia train"):
        common.check_finite(torch.tensor(float("nan")), 7, "pythia train")
    with pytest.raises(SystemExit, match=r"step 8: grad norm inf"):
        common.check_finite(1.0, 8, "x", grad_norm=torch.tensor(float("inf")))


def test_no_checkpoint_or_results_from_nonfinite_values(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "m.pt"
    common.save_checkpoint(path, method="toy", args={}, model=model)
    good = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="m.pt: not saved, 1 model tensors hold NaN/inf"):
        common.save_checkpoint(path, method="toy", args={}, model=model)
    assert path.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["m.pt"]
    with pytest.raises(SystemExit, match="encoder"):
        common.save_checkpoint(path, method="toy", args={}, model=nn.Linear(1, 1), encoder=model)
    out = tmp_path / "results.json"
    common.write_json_atomic(out, dict(auc=np.float32(0.9), runs=[1, 2]))
    assert json.loads(out.read_text()) == dict(auc=pytest.approx(0.9), runs=[1, 2])
    with pytest.raises(SystemExit, match=r"results.json: not written, mean.auc = nan"):
        common.write_json_atomic(out, dict(mean=dict(auc=np.float64("nan")), runs=[1, 2, 3]))
    assert json.loads(out.read_text())["runs"] == [1, 2]     # the old file is untouched
    with pytest.raises(SystemExit, match=r"per_seed\[1\].loss = inf"):
        common.write_json_atomic(out, dict(per_seed=[dict(loss=1.0), dict(loss=float("inf"))]),
                                 finite=("loss", "auc"))
    common.write_json_atomic(out, dict(auc=0.9, rej50=float("inf")), finite=("loss", "auc"))
    assert json.loads(out.read_text())["rej50"] == float("inf")


# --- 2./3. the cache validates itself ------------------------------------------------------------

def test_cache_entry_without_meta_is_rebuilt(tmp_path, tmp_cache):
    d = two_files(tmp_path)
    first = common.load_jets("pythia", d)
    (entry,) = [p for p in tmp_cache.iterdir()]
    (entry / "meta.json").unlink()                   # a copy or a crash lost it
    with pytest.warns(UserWarning, match="broken.*meta.json.*rebuilding"):
        again = common.load_jets("pythia", d)
    assert again is not None and np.array_equal(again.x, first.x)
    assert (entry / "meta.json").is_file()


def test_cache_save_onto_a_broken_folder(tmp_path, tmp_cache):
    jets = common.load_jets("pythia", two_files(tmp_path), cache=False)
    (tmp_cache / "k").mkdir(parents=True)
    (tmp_cache / "k" / "junk").write_text("x")       # non-empty: os.replace onto it fails
    with pytest.warns(UserWarning, match="rebuilding"):
        hit = common.cache_save(jets, "k", {})
    assert hit is not None and np.array_equal(hit.y, jets.y)
    assert not (tmp_cache / "k" / "junk").exists()


@pytest.mark.parametrize("damage", ["truncate", "shape", "garbage"])
def test_damaged_cache_array_is_rebuilt(tmp_path, tmp_cache, damage):
    d = two_files(tmp_path)
    first_x = np.array(common.load_jets("pythia", d).x)  # a copy: x.npy is damaged below
    (entry,) = [p for p in tmp_cache.iterdir()]
    f = entry / "x.npy"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "shape":
        np.save(f, np.zeros((3, 2, 7), dtype=np.float32))
    else:
        f.write_bytes(b"not an array")
    with pytest.warns(UserWarning, match=f"cache entry .*{entry.name}.*x.npy.*rebuilding"):
        again = common.load_jets("pythia", d)
    assert np.array_equal(again.x, first_x)
    with warnings.catch_warnings():                  # healed: the next load is silent
        warnings.simplefilter("error")
        common.load_jets("pythia", d)


# --- 4. the downloader checks what it received ---------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `body` at /f.bin; `mode` picks a misbehaviour for the first `bad` requests."""
    body, mode, bad, seen = b"", "ok", 0, []
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        cls = type(self)
        rng = self.headers.get("Range")
        cls.seen.append(rng)
        mode = cls.mode if cls.bad > 0 else "ok"
        cls.bad -= 1
        if self.path != "/f.bin" or mode == "404":
            self.send_error(404)
            return
        if mode == "500":
            self.send_error(500)
            return
        body = self.body
        start = int(rng.split("=")[1].split("-")[0]) if rng and mode != "norange" else 0
        if mode == "html":
            page = b"<!DOCTYPE html><html>moved</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if start:
            self.send_response(206)
            first = start + 100 if mode == "badrange" else start
            self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "cut":                            # drop the connection half way
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if mode == "stall":
            self.wfile.write(body[start:start + 1000])
            self.wfile.flush()
            time.sleep(3)                            # the client times out first (STALL)
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads, block_on_close = True, False    # a stalled handler never holds up teardown


@pytest.fixture
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    Handler.body, Handler.mode, Handler.bad, Handler.seen = os.urandom(50_000), "ok", 0, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


FAST = dict(progress=False, retries=2, timeout=1.0, backoff=0.01)
STALL = dict(FAST, timeout=0.5)                      # a stall costs one timeout per try


def fast(mode):
    return STALL if mode == "stall" else FAST


@pytest.mark.parametrize("mode", ["cut", "stall", "500"])
def test_fetch_retries_and_resumes(server, tmp_path, mode):
    Handler.mode, Handler.bad = mode, 1              # the first try fails, the retry works
    md5 = hashlib.md5(Handler.body).hexdigest()
    got = download.fetch(server + "/f.bin", tmp_path / "f.bin", md5=md5, **fast(mode))
    assert got.read_bytes() == Handler.body and not (tmp_path / "f.bin.part").exists()
    assert len(Handler.seen) == 2
    if mode != "500":                                # the retry resumed where the cut was
        assert Handler.seen[1] is not None and Handler.seen[1].startswith("bytes=")


@pytest.mark.parametrize("mode", ["cut", "stall"])
def test_fetch_gives_up_in_one_line_and_keeps_the_part(server, tmp_path, mode):
    Handler.mode, Handler.bad = mode, 99
    t0 = time.time()
    with pytest.raises(SystemExit) as e:             # no md5: a short file must not pass
        download.fetch(server + "/f.bin", tmp_path / "f.bin", **fast(mode))
    assert "3 tries" in str(e.value) and "\n" not in str(e.value) and time.time() - t0 < 20
    assert not (tmp_path / "f.bin").exists()
    part = tmp_path / "f.bin.part"
    assert 0 < part.stat().st_size < len(Handler.body)
    Handler.bad = 0                                  # the next run resumes the part
    download.fetch(server + "/f.bin", tmp_path / "f.bin", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == Handler.body


@pytest.mark.parametrize("mode", ["norange", "badrange"])
def test_fetch_without_or_with_wrong_range(server, tmp_path, mode):
    part = tmp_path / "f.bin.part"
    part.write_bytes(Handler.body[:20_000])
    Handler.mode, Handler.bad = mode, 1
    download.fetch(server + "/f.bin", tmp_path / "f.bin", **FAST)
    assert (tmp_path / "f.bin").read_bytes() == Handler.body   # never a spliced file


@pytest.mark.parametrize("mode,match", [("404", "HTTP 404"), ("500", "HTTP 500"),
                                        ("html", "HTML page")])
def test_fetch_errors(server, tmp_path, mode, match):
    Handler.mode, Handler.bad = mode, 99
    with pytest.raises(SystemExit, match=match):
        download.fetch(server + "/f.bin", tmp_path / "f.bin", **FAST)
    assert not (tmp_path / "f.bin").exists()
    assert len(Handler.seen) == (3 if mode == "500" else 1)    # only 5xx is retried
    Handler.seen.clear()
    Handler.body = b"  <html>no type header</html>" + Handler.body
    Handler.mode = "ok"
    with pytest.raises(SystemExit, match="HTML"):
        download.fetch(server + "/f.bin", tmp_path / "f.bin", **FAST)


def test_fetch_md5_mismatch_removes_the_part(server, tmp_path):
    with pytest.raises(SystemExit, match="md5"):
        download.fetch(server + "/f.bin", tmp_path / "f.bin", md5="0" * 32, **FAST)
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin").exists()


def test_download_checks_an_existing_file(server, tmp_path, monkeypatch):
    urls = [(server + "/f.bin", None)]
    monkeypatch.setitem(download.DOWNLOADS, ("toptagging", None), urls)
    monkeypatch.setattr(common, "_num_entries", lambda source, path: 0)
    out = tmp_path / "tt"
    out.mkdir()
    (out / "f.bin").write_bytes(Handler.body[:1234])  # a truncated file renamed into place
    (out / "x.pt.tmp").write_bytes(b"")              # a stale temporary file
    download.download("toptagging", out_dir=out, **FAST)
    assert (out / "f.bin").read_bytes() == Handler.body
    assert Handler.seen == ["bytes=1234-"] and not (out / "x.pt.tmp").exists()
    download.download("toptagging", out_dir=out, **FAST)
    assert len(Handler.seen) == 1                     # complete: kept without a GET


# --- 5./6. labels and malformed branches: errors name the file ----------------------------------

def test_labels_must_be_one_hot(tmp_path):
    f = write_jetclass(tmp_path / "d/train/ZToQQ_000.root", random_jets(6, 0), "Zqq")
    arrays = {k: v for k, v in uproot.open(f)["tree"].arrays(library="np").items()
              if not k.startswith("n")}                          # counters: uproot adds its own
    for mode, match in (("none", "2 jets have no label_\\* set and 0 have several"),
                        ("two", "0 jets have no label_\\* set and 2 have several")):
        d = {k: ak.Array(v.tolist()) if v.dtype == object else v for k, v in arrays.items()}
        d["label_Zqq"] = d["label_Zqq"].copy()
        if mode == "none":
            d["label_Zqq"][:2] = 0
        else:
            d["label_QCD"] = d["label_QCD"].copy()
            d["label_QCD"][:2] = 1
        g = tmp_path / mode / "train/ZToQQ_000.root"
        g.parent.mkdir(parents=True)
        with uproot.recreate(g) as out:
            out.mktree("tree", d)
        with pytest.raises(SystemExit, match=f"ZToQQ_000.root.*{match}"):
            common.load_jets("pythia", tmp_path / mode, cache=False)
    h5 = write_toptagging(tmp_path / "l.h5", np.tile([[[10.0, 6, 8, 0]]], (3, 1, 1)), [0, 1, 2])
    with pytest.raises(SystemExit, match="l.h5.*is_signal_new.*1 of 3"):
        common.load_jets("toptagging", h5, cache=False)


def _tree(tmp_path, name, **change):
    jets = random_jets(4, 0)
    f = write_jetclass(tmp_path / "src.root", jets, "Wqq")
    d = {k: ak.Array(v.tolist()) if v.dtype == object else v
         for k, v in uproot.open(f)["tree"].arrays(library="np").items()}
    d = {k: v for k, v in d.items() if not k.startswith("n")}   # counters: uproot adds its own
    d.update(change)
    g = tmp_path / name / "train/WToQQ_000.root"
    g.parent.mkdir(parents=True)
    with uproot.recreate(g) as out:
        out.mktree("tree", d)
    return tmp_path / name


def test_malformed_branches_name_file_and_branch(tmp_path):
    flat = _tree(tmp_path, "flat", part_px=np.ones(4, dtype=np.float32))
    with pytest.raises(SystemExit, match="WToQQ_000.root: branch 'part_px'.*variable-length"):
        common.load_jets("pythia", flat, cache=False)
    short = _tree(tmp_path, "short", part_py=ak.Array([[1.0]] * 4))
    with pytest.raises(SystemExit, match="WToQQ_000.root: branch 'part_py'.*4 of 4 jets"):
        common.load_jets("pythia", short, cache=False)
    jagged = _tree(tmp_path, "jagged", jet_pt=ak.Array([[600.0, 1.0]] * 4))
    with pytest.raises(SystemExit, match="WToQQ_000.root: branch 'jet_pt'.*one number per jet"):
        common.load_jets("pythia", jagged, cache=False)


# --- 7. bad CLI values and empty inputs ----------------------------------------------------------

@pytest.mark.parametrize("argv", [["--n-jets", "0"], ["--n-jets", "-5"], ["--batch-size", "0"],
                                  ["--batch-size", "-4"], ["--n-max", "0"], ["--epochs", "0"],
                                  ["--lr", "0"], ["--lr", "nan"], ["--weight-decay", "-1"],
                                  ["--warmup", "-1"], ["--grad-clip", "-0.5"],
                                  ["--eval-every", "-1"], ["--n-eval", "0"], ["--steps", "-1"],
                                  ["--workers", "-2"], ["--shuffle-buffer", "0"],
                                  ["--epochs", "two"]])
def test_bad_flag_values_are_usage_errors(argv, capsys):
    p = common.add_common_args(argparse.ArgumentParser(prog="x"))
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"x: error: argument {argv[0]}:") and "Traceback" not in err


def test_flag_types_and_help_defaults_once():
    assert common.positive_int("3") == 3 and common.nonneg_int("0") == 0
    assert common.positive_float("1e-3") == 1e-3 and common.nonneg_float("0") == 0.0
    assert common.fraction("1") == 1.0 and common.fraction("0.25") == 0.25
    for bad in ("0", "1.5", "-0.1", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.fraction(bad)
    p = common.add_common_args(argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    assert p.format_help().count("(default:") == sum(1 for a in p._actions if a.help) - 1  # -h
    a = p.parse_args([])
    assert a.steps == 0 and a.workers == 0 and a.shuffle_buffer == 100_000 and a.warmup is None


def test_warmup_default_is_a_fraction_of_short_runs():
    assert common.warmup_steps(None, 15) == 1 and common.warmup_steps(None, 400) == 20
    assert common.warmup_steps(None, 100_000) == 100
    assert common.lr_at(0, 15, None, 1.0) == 1.0      # a 15-step run reaches its peak at once
    with pytest.warns(UserWarning, match="--warmup 100 exceeds the run's 15 steps"):
        assert common.warmup_steps(100, 15) == 100


def test_n_jets_zero_and_empty_trees(tmp_path):
    d = two_files(tmp_path)
    with pytest.raises(ValueError, match="n_jets"):
        common.load_jets("pythia", d, n_jets=0)
    with pytest.raises(ValueError, match="n_jets"):
        common.load_jets("pythia", d, n_jets=-5)
    write_jetclass(tmp_path / "e/train/TTBar_000.root", [], "Tbqq")  # a 0-entry tree
    with pytest.raises(SystemExit, match="no jets read from 1 file.*TTBar_000.root"), \
            pytest.warns(UserWarning, match="hold 0 jets"):
        common.load_jets("pythia", tmp_path / "e")
    write_jetclass(tmp_path / "e/train/ZJetsToNuNu_000.root", random_jets(5, 0), "QCD")
    empty = "1 file\\(s\\) hold 0 jets and are skipped: .*TTBar_000.root"
    with pytest.warns(UserWarning, match=empty):                    # skipped, and said so
        assert len(common.load_jets("pythia", tmp_path / "e")) == 5
    with pytest.warns(UserWarning, match=empty):
        s = common.JetStream("pythia", path=tmp_path / "e", batch_size=2, n_max=8)
    assert sorted(s.counts) == [0, 5] and len(s) == 2               # the empty file: no units
    assert sum(len(b["y"]) for b in common.loader(s, torch.device("cpu"))) == 4
    with pytest.raises(SystemExit, match="fewer than one step"), pytest.warns(UserWarning):
        common.JetStream("pythia", path=tmp_path / "e", classes=["Tbqq"], batch_size=2)


# --- 8. resume checks the run --------------------------------------------------------------------

def test_resume_with_another_architecture_or_batch_size(tmp_path):
    args = dict(batch_size=8, n_max=32, features="kin", data="pythia", lr=1e-3, frame="visible")
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    common.save_checkpoint(tmp_path / "a.pt", method="toy", args=args, model=model, step=5)
    assert common.resume_from(tmp_path / "a.pt", model, args=dict(args, lr=5e-4, steps=9)) == 5
    # a method's own task flag (mpm's and diffmae's --frame) is part of the run
    with pytest.raises(SystemExit, match=r"--frame: checkpoint 'visible', now 'jet'"):
        common.resume_from(tmp_path / "a.pt", model, args=dict(args, frame="jet"))
    wider = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1), nn.ReLU(), nn.Linear(1, 1))
    with pytest.raises(SystemExit, match=r"0.weight: checkpoint \(4, 3\), model \(8, 3\).*"
                                         r"3.weight: only in the model"):
        common.resume_from(tmp_path / "a.pt", wider)
    ns = argparse.Namespace(**dict(args, batch_size=16, n_max=64))
    with pytest.raises(SystemExit, match=r"--batch-size: checkpoint 8, now 16; --n-max: "
                                         r"checkpoint 32, now 64") as e:
        common.resume_from(tmp_path / "a.pt", model, args=ns)
    assert "\n" not in str(e.value)


# --- 9. leftovers --------------------------------------------------------------------------------

def test_stale_temporaries_are_removed(tmp_path, tmp_cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                      # a PID that is surely not running now
    tmp_cache.mkdir()
    (tmp_cache / f".abc.tmp{dead.pid}").mkdir()      # a cache build killed mid-way
    (tmp_cache / f".abc.tmp{dead.pid}" / "x.npy").write_bytes(b"..")
    (tmp_cache / f".live.tmp{os.getpid()}").mkdir()  # a build that is still running
    common.load_jets("pythia", two_files(tmp_path))
    names = sorted(p.name for p in tmp_cache.iterdir())
    assert f".abc.tmp{dead.pid}" not in names and f".live.tmp{os.getpid()}" in names
    out = tmp_path / "run"
    out.mkdir()
    (out / "m.pt.tmp").write_bytes(b"half a checkpoint")            # killed save (old name)
    (out / f"m.pt.{dead.pid}.tmp").write_bytes(b"half a checkpoint")
    common.save_checkpoint(out / "m.pt", method="toy", args={}, model=nn.Linear(1, 1))
    assert sorted(os.listdir(out)) == ["m.pt"]


def test_resumed_log_has_each_step_once(tmp_path):
    path = tmp_path / "run.jsonl"
    log = common.JsonlLogger(path)
    log.log(dict(config="x"))
    for step in range(0, 12, 2):                     # the checkpoint was at step 6
        log.log(dict(step=step, loss=1.0))
    with open(path, "a") as f:
        f.write('{"step": 12, "lo')                  # a line cut by the kill
    log = common.JsonlLogger(path, resume_step=6)   # step 6's record came before its save
    for step in range(8, 12, 2):
        log.log(dict(step=step, loss=0.5))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == dict(config="x")
    assert [r["step"] for r in records[1:]] == [0, 2, 4, 6, 8, 10]
    assert records[4]["loss"] == 1.0 and records[-1]["loss"] == 0.5
    common.JsonlLogger(path).log(dict(step=1))      # a new run starts its own log
    assert [json.loads(line) for line in path.read_text().splitlines()] == [dict(step=1)]


# --- 10. clean DDP teardown (the two-process run is tests/test_harness.py) -----------------------

def test_cleanup_waits_for_every_rank(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    common.cleanup(common.Setup(torch.device("cpu"), "cpu", None, ddp=True))
    assert calls == ["barrier", "destroy"]


# --- copied alone, output to files ---------------------------------------------------------------

def test_pythia_default_without_jetgen_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    monkeypatch.setitem(sys.modules, "scripts.jetgen", None)  # import jetgen -> ImportError
    with pytest.raises(SystemExit, match="copy scripts/jetgen.py too, or use --data "
                                         "toptagging or --data jetclass with --data-dir") as e:
        common.load_jets("pythia")
    assert "\n" not in str(e.value)


def test_progress_bar_is_throttled_in_log_files(capsys):
    bar = common.progress_bar(5000, 10)              # stderr is captured: not a terminal
    assert bar.mininterval >= 30                     # a loop of minutes writes a few lines
    for _ in range(5000):
        bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert 1 <= len(lines) <= 3
