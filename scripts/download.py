"""Download the public datasets: JetClass (ROOT tarballs, md5-checked) and Top Tagging (HDF5).

    python -m scripts.download jetclass --split val --dir data/JetClass    (5M jets, one tarball)
    python -m scripts.download jetclass --split train                      (ten tarballs, 100M)
    python -m scripts.download toptagging --dir data/toptagging            (train/val/test .h5)

Run once, from the repository root, as nanoGPT's prepare scripts are; no method script imports
this file. Resumable: an interrupted file stays as `<name>.part` and the next run continues it.
"""

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import common

ZENODO_JETCLASS = "https://zenodo.org/record/6619768/files/"
ZENODO_TOPTAG = "https://zenodo.org/record/2603256/files/"
# (url, md5); md5 sums as published with particle_transformer's get_datasets.py
DOWNLOADS = {
    ("jetclass", "train"): [
        (ZENODO_JETCLASS + f"JetClass_Pythia_train_100M_part{i}.tar", md5)
        for i, md5 in enumerate([
            "de4fd2dca2e68ab3c85d5cfd3bcc65c3", "9722a359c5ef697bea0fbf79bf50f003",
            "1e9f66cd1f915f9d10e90ae1d7761720", "47348fc8985319fa4806da87500482fa",
            "6b0ce16bd93b442a8d51914466990279", "416e347512e716de51d392bee327b8e9",
            "e9b9c1557b1b39bf0a16e4ab631ae451", "5bfc6cb285ccb7680cefa9ac82ad1a2e",
            "540c1a0d66dfad78d2b363c5740ccf86", "668f40b3275167ff7104c48317c0ae2a"])],
    ("jetclass", "val"): [(ZENODO_JETCLASS + "JetClass_Pythia_val_5M.tar",
                           "7235ccb577ed85023ea3ab4d5e6160cf")],
    ("jetclass", "test"): [(ZENODO_JETCLASS + "JetClass_Pythia_test_20M.tar",
                            "64e5156d26d101adeb43b8388207d767")],
    # no published md5 for these: each file is checked by opening it with the reader instead
    ("toptagging", None): [(ZENODO_TOPTAG + f"{s}.h5", None) for s in ("train", "val", "test")],
}


def _md5(path, block=1 << 22):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class _Retry(Exception):
    """A transient download failure (timeout, dropped connection, short body, HTTP 5xx)."""


def fetch(url, dest, md5=None, progress=True, retries=4, timeout=60, backoff=2.0):
    """Download url to dest through dest.part, then rename. What arrives is checked: the byte
    count against Content-Length, a 206 reply's Content-Range against the offset asked for (a
    wrong one is not appended: the download starts over), and the body is not an HTML page.
    A timeout, a dropped connection or a short body is retried `retries` times with
    exponential backoff (backoff x 1, 2, 4... seconds), each try resuming dest.part with an
    HTTP Range request; the last failure is a one-line SystemExit and dest.part stays for the
    next run to resume. Only an md5 mismatch removes dest.part (it cannot be trusted)."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, progress, timeout)
            break
        except _Retry as e:
            if attempt == retries:
                raise SystemExit(f"{url}: {e} ({retries + 1} tries); run the command again to "
                                 f"resume from {part}") from None
            time.sleep(backoff * 2 ** attempt)
    if md5 is not None and (got := _md5(part)) != md5:
        part.unlink()
        raise SystemExit(f"{dest}: md5 {got} does not match the published {md5}; the download "
                         "was removed, run the command again")
    os.replace(part, dest)
    return dest


def _fetch_once(url, part, progress, timeout):
    """One request: append to `part` from its current size. Returns when the body is complete;
    raises _Retry for what another try may fix, SystemExit for what it will not."""
    import http.client
    from tqdm import tqdm
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # range not satisfiable: complete if the server's size is ours
            total = e.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) != have:
                part.unlink()
                raise _Retry(f"{part.name} holds {have} bytes, the file {total}: "
                             "starting over") from None
            return
        if e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise SystemExit(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timeout (all OSError)
        raise _Retry(f"cannot connect ({getattr(e, 'reason', e)})") from None
    with resp:
        if "text/html" in resp.headers.get("Content-Type", ""):
            raise SystemExit(f"{url}: the server sent an HTML page, not the file (moved, or an "
                             "error or login page); check the URL")
        if have and resp.status == 206:
            first = resp.headers.get("Content-Range", "").partition(" ")[2].partition("-")[0]
            if first != str(have):  # appending from another offset would corrupt the file
                part.unlink()
                raise _Retry(f"asked for bytes from {have}, got Content-Range "
                             f"{resp.headers.get('Content-Range')!r}: starting over")
        elif have:  # the server ignored the Range header: it sends the whole file
            have = 0
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        got = 0
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=length + have if length is not None else None, initial=have,
                     unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress,
                     mininterval=1 if sys.stderr.isatty() else 30) as bar:
            try:
                while chunk := resp.read1(1 << 20):  # what has arrived: a stall keeps it
                    if not have and not got and chunk.lstrip()[:1] == b"<":
                        raise SystemExit(f"{url}: the server sent an HTML/XML page, not the "
                                         "file; check the URL")
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # timeout, reset, IncompleteRead
                raise _Retry(f"connection lost after {have + got} bytes "
                             f"({type(e).__name__})") from None
        if length is not None and got != length:
            raise _Retry(f"short read: {got} of {length} bytes")


def _remote_size(url, timeout=60):
    """Content-Length of a HEAD request, or None when the server cannot tell."""
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            n = resp.headers.get("Content-Length")
            return int(n) if n and n.isdigit() else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _complete(dest, url, md5, timeout=60):
    """An existing download is kept when its md5 matches (when published) or its size equals
    the server's. A shorter file becomes dest.part (the next fetch resumes it); any other is
    removed."""
    if md5 is not None:
        ok = _md5(dest) == md5
    else:
        size = _remote_size(url, timeout)
        ok = size is None or size == dest.stat().st_size  # offline: the reader checks the file
        if not ok and dest.stat().st_size < size:
            print(f"{dest}: {dest.stat().st_size} of {size} bytes; resuming the download")
            os.replace(dest, dest.with_name(dest.name + ".part"))
            return False
    if not ok:
        print(f"{dest}: incomplete or corrupt (size or md5); downloading it again")
        dest.unlink()
    return ok


def extract_root_tar(tar_path, out_dir, split_dir):
    """Extract a JetClass tarball and move its .root files into out_dir/split_dir/ (whatever
    folders the tarball uses inside), each with an atomic rename."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".extract-{Path(tar_path).stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
    (out_dir / split_dir).mkdir(parents=True, exist_ok=True)
    moved = 0
    for f in sorted(tmp.rglob("*.root")):
        os.replace(f, out_dir / split_dir / f.name)
        moved += 1
    shutil.rmtree(tmp)
    if not moved:
        raise SystemExit(f"{tar_path}: the archive holds no .root files")
    return moved


def download(dataset, split="val", out_dir=None, progress=True, **fetch_options):
    """Fetch a public dataset into out_dir (see fetch; fetch_options: retries, timeout, backoff).
    Files already there are checked (md5, or size against the server's) before being kept."""
    out_dir = Path(out_dir or common.default_data_dir(dataset))
    out_dir.mkdir(parents=True, exist_ok=True)
    common.remove_stale_tmp(out_dir)
    timeout = fetch_options.get("timeout", 60)
    if dataset == "toptagging":
        for url, md5 in DOWNLOADS[("toptagging", None)]:
            dest = out_dir / url.rsplit("/", 1)[1]
            if not (dest.exists() and _complete(dest, url, md5, timeout)):
                fetch(url, dest, md5, progress, **fetch_options)
            n = common._num_entries("toptagging", dest)  # opens the table: fails loudly if corrupt
            print(f"{dest}: {n} jets")
        return out_dir
    for url, md5 in DOWNLOADS[("jetclass", split)]:
        tar = out_dir / url.rsplit("/", 1)[1]
        done = out_dir / f".{tar.name}.done"  # the tarball is deleted after extraction
        if done.exists():
            continue
        if not (tar.exists() and _complete(tar, url, md5, timeout)):
            fetch(url, tar, md5, progress, **fetch_options)
        split_dir = common.SPLIT_DIRS[split][0]
        n = extract_root_tar(tar, out_dir, split_dir)
        done.touch()
        tar.unlink()
        print(f"{tar.name}: {n} files into {out_dir / split_dir}")
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m scripts.download",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["jetclass", "toptagging"])
    parser.add_argument("--split", choices=list(common.SPLIT_DIRS), default="val",
                        help="JetClass split: train (10 tarballs, 100M jets), val (5M), "
                        "test (20M)")
    parser.add_argument("--dir", default=None, help="target folder (default data/JetClass or "
                        "data/toptagging)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    download(args.dataset, args.split, args.dir, progress=not args.no_progress)


if __name__ == "__main__":
    main()
