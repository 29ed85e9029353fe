"""Download, verify and unpack the benchmark datasets into the data root.

    python datasets/download.py DATASET [--data-root DIR] [--mirror URL] [--list]

DATASET: oxford5k, paris6k, revisited, oxford100k, revisitop1m, vgg16_caffe (a note:
the weights need a manual conversion), or all. The layout made under the data root is
the one the settings files expect (``$DATA/oxford5k/images``, ``$DATA/oxford5k/gt_files``,
``$DATA/paris6k/images``, ``$DATA/paris6k/gt_data``, ``$DATA/revisited/gnd_*.pkl``,
``$DATA/oxford100k/images``, ``$DATA/revisitop1m/jpg``).

Why each step:
- downloads go to ``<data root>/downloads/<file>.part`` and resume with an HTTP Range
  request, so an interrupted 2 GB tarball is not fetched again from the start;
- a finished file is checked against its md5/sha256 when the registry knows it; when it
  does not (the publishers give none), the sha256 computed on first download is recorded
  in ``downloads/checksums.json`` and later downloads must match it;
- archives are unpacked into a temporary folder first (every member checked: no absolute
  paths, no ``..``, no links or devices), then moved into place; a corrupt or truncated
  archive is rejected and nothing of it lands in the data root.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lib.artefacts import atomic_path, write_json_atomic
from lib.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRIES = 3


@dataclass(frozen=True)
class Resource:
    """One file to fetch. ``dest`` is relative to the data root: the folder an archive
    is unpacked into, or the path a plain file is copied to. ``flatten`` puts every
    archive member directly into ``dest`` (the settings expect flat image folders)."""

    url: str
    dest: str
    md5: str | None = None
    sha256: str | None = None
    archive: bool = True
    flatten: bool = False
    strip: int = 0  # leading path components dropped (when not flattening)

    @property
    def filename(self) -> str:
        return PurePosixPath(self.url.split("?", 1)[0]).name


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    resources: tuple[Resource, ...]
    known_corrupt: tuple[str, ...] = ()  # image files known to be unreadable
    corrupt_list: str | None = None  # where the known-corrupt list is written
    note: str = ""


_OXF = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PAR = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_REV = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg"

# The 20 Paris6k images that fail to decode (spec §1.13: "Paris has 20 known corrupt
# images"); none of them is in the revisited rparis6k imlist, which dropped them.
PARIS_CORRUPT = tuple(f"paris_{n}.jpg" for n in (
    "louvre_000136", "louvre_000146", "moulinrouge_000422", "museedorsay_001059",
    "notredame_000188", "pantheon_000284", "pantheon_000960", "pantheon_000974",
    "pompidou_000195", "pompidou_000196", "pompidou_000201", "pompidou_000467",
    "pompidou_000640", "sacrecoeur_000299", "sacrecoeur_000330", "sacrecoeur_000353",
    "triomphe_000662", "triomphe_000833", "triomphe_000863", "triomphe_000867"))

# Checksums: the revisited md5s are published by its authors. The Oxford VGG pages and
# the R1M mirror publish none for these files, so they are null here: the sha256 of the
# first download is recorded in downloads/checksums.json and enforced afterwards.
REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    Dataset("oxford5k", "Oxford Buildings: 5,063 images + gt_files (55 queries)", (
        Resource(f"{_OXF}/oxbuild_images.tgz", "oxford5k/images", flatten=True),
        Resource(f"{_OXF}/gt_files_170407.tgz", "oxford5k/gt_files", flatten=True),
    )),
    Dataset("paris6k", "Paris: 6,412 images in two tarballs + gt_data (55 queries)", (
        Resource(f"{_PAR}/paris_1.tgz", "paris6k/images", flatten=True),
        Resource(f"{_PAR}/paris_2.tgz", "paris6k/images", flatten=True),
        Resource(f"{_PAR}/paris_120310.tgz", "paris6k/gt_data", flatten=True),
    ), known_corrupt=PARIS_CORRUPT, corrupt_list="paris6k/corrupted.txt",
        note="the 20 known corrupt images are kept and listed in paris6k/corrupted.txt; "
             "step A lists them as unreadable and leaves them out"),
    Dataset("revisited", "Revisited Oxford and Paris ground truth (gnd_*.pkl)", (
        Resource(f"{_REV}/roxford5k/gnd_roxford5k.pkl", "revisited/gnd_roxford5k.pkl",
                 md5="f2b67579f625a587b5b0828dbf2e8eb0", archive=False),
        Resource(f"{_REV}/rparis6k/gnd_rparis6k.pkl", "revisited/gnd_rparis6k.pkl",
                 md5="2feae0a8257a5c6ca1b31b8eb73c8571", archive=False),
    ), note="the images are those of oxford5k and paris6k (download them too)"),
    Dataset("oxford100k", "Flickr 100k distractors (Oxford105k / Paris106k)", (
        Resource(f"{_OXF}/oxc1_100k.tgz", "oxford100k/images", flatten=True),
    )),
    Dataset("revisitop1m", "R1M distractors: 1,001,001 images in 100 tarballs", tuple(
        Resource(f"{_R1M}/revisitop1m.{i}.tar.gz", "revisitop1m/jpg", flatten=False)
        for i in range(1, 101))),
    Dataset("vgg16_caffe", "VGG16 Caffe weights (ILSVRC-2014 release)", (), note=(
        "not downloadable as PyTorch weights: fetch VGG_ILSVRC_16_layers.caffemodel from "
        "the Oxford VGG 'Very Deep' page, convert it to a .pth state dict (conv layers, "
        "BGR 0-255 mean-subtracted input) and put it at $DATA/weights/vgg16_caffe.pth")),
)}


# --------------------------------------------------------------------------- fetching


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, target: Path, timeout: float = 60.0, retries: int = RETRIES) -> Path:
    """Fetch ``url`` to ``target`` via ``target.part``, resuming with an HTTP Range
    request after an interruption (also across runs). Returns ``target``."""
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status != 206:
                    log.info("%s: server ignored the range request; starting over", url)
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True,
                        desc=target.name, disable=None, mininterval=1.0) as bar:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        bar.update(len(block))
                if total is not None and part.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
            os.replace(part, target)
            return target
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to send: the .part is complete
                os.replace(part, target)
                return target
            raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError, OSError) as e:
            last = e
            got = part.stat().st_size if part.exists() else 0
            log.warning("%s: interrupted after %d bytes (%s); resuming (try %d of %d)",
                        url, got, e, attempt + 1, retries)
            time.sleep(min(2 ** attempt * 0.1, 2.0))
    raise UserError(f"{url}: download failed ({last}); rerun the same command to resume "
                    f"from {part}")


def verify(path: Path, res: Resource, record: dict[str, str]) -> str | None:
    """Check md5/sha256 (the published ones, else the sha256 recorded on first download).
    A mismatch deletes the file (a rerun downloads it again). Returns the sha256 to record
    once the file has proved readable, when there is nothing to check against yet."""
    checks = []
    if res.md5:
        checks.append(("md5", res.md5))
    if res.sha256:
        checks.append(("sha256", res.sha256))
    if not res.sha256 and res.filename in record:
        checks.append(("sha256", record[res.filename]))
    for algo, want in checks:
        got = _hash_file(path, algo)
        if got != want:
            path.unlink()
            raise UserError(f"{path.name}: {algo} checksum mismatch (expected {want}, got "
                            f"{got}); the file was deleted, rerun to download it again")
    if res.sha256 or res.filename in record:
        return None
    return _hash_file(path, "sha256")


# --------------------------------------------------------------------------- unpacking


def _member_target(m: tarfile.TarInfo, res: Resource, archive: Path) -> PurePosixPath | None:
    """Where a member goes under ``dest`` (None: skipped), refusing unsafe members."""
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts or "\\" in m.name:
        raise UserError(f"{archive.name}: unsafe member path {m.name!r}; archive refused")
    if m.issym() or m.islnk() or not (m.isfile() or m.isdir()):
        raise UserError(f"{archive.name}: member {m.name!r} is a link or special file; "
                        "archive refused")
    if m.isdir():
        return None
    parts = [p for p in name.parts if p not in ("", ".")]
    parts = parts[-1:] if res.flatten else parts[res.strip:]
    if not parts or parts[-1].startswith("._"):  # macOS resource forks
        return None
    return PurePosixPath(*parts)


def unpack(archive: Path, dest: Path, res: Resource) -> int:
    """Unpack ``archive`` into ``dest``: all into a temporary sibling folder first, then
    moved in. Returns the number of files. A corrupt archive raises UserError and leaves
    ``dest`` as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    placed: list[PurePosixPath] = []
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                seen: set[PurePosixPath] = set()
                for m in tar:
                    rel = _member_target(m, res, archive)
                    if rel is None:
                        continue
                    if rel in seen:
                        raise UserError(f"{archive.name}: two members unpack to {rel}; "
                                        "archive refused")
                    seen.add(rel)
                    src = tar.extractfile(m)
                    if src is None:
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with src, open(out, "wb") as f:
                        shutil.copyfileobj(src, f, CHUNK)
                    placed.append(rel)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{archive.name}: corrupt or truncated archive ({e}); nothing "
                            "unpacked") from None
        if not placed:
            raise UserError(f"{archive.name}: the archive holds no files; nothing unpacked")
        dest.mkdir(parents=True, exist_ok=True)
        for rel in placed:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(placed)


def _install_file(src: Path, dest: Path, check: Callable[[Path], None] | None) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        if check is not None:
            check(tmp)


def _check_pickle(path: Path) -> None:
    from lib.groundtruth.revisited import load_restricted_pickle

    data = load_restricted_pickle(path)
    if not isinstance(data, dict) or "gnd" not in data:
        raise UserError(f"{path.name}: not a revisited ground-truth pickle")


# --------------------------------------------------------------------------- driver


def fetch_dataset(ds: Dataset, data_root: Path, mirror: str | None = None,
                  timeout: float = 60.0) -> list[str]:
    """Download, verify and install every resource of ``ds``; return one line per
    resource saying where it went. Finished resources are skipped on a rerun (a marker
    ``downloads/<file>.done`` is written once a resource is installed)."""
    data_root = Path(data_root).resolve()
    dl = data_root / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sums_path = dl / "checksums.json"
    record: dict[str, str] = {}
    if sums_path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(sums_path.read_text(encoding="utf-8"))
    report = []
    if ds.note and not ds.resources:
        return [f"{ds.name}: {ds.note}"]
    for res in ds.resources:
        url = res.url if mirror is None else f"{mirror.rstrip('/')}/{res.filename}"
        dest = data_root / res.dest
        done = dl / f"{res.filename}.done"
        if done.is_file() and dest.exists():
            report.append(f"{res.filename}: already installed -> {dest}")
            continue
        path = dl / res.filename
        if not path.is_file():
            download(url, path, timeout=timeout)
        new_sum = verify(path, res, record)
        try:
            if res.archive:
                n = unpack(path, dest, res)
                report.append(f"{res.filename}: {n} files -> {dest}")
            else:
                _install_file(path, dest, _check_pickle if dest.suffix == ".pkl" else None)
                report.append(f"{res.filename} -> {dest}")
        except UserError:
            if new_sum is not None:  # unverifiable and unreadable: fetch it afresh next time
                path.unlink()
            raise
        if new_sum is not None:
            record[res.filename] = new_sum
            write_json_atomic(sums_path, record)
            log.info("%s: no published checksum; recorded sha256 %s", res.filename, new_sum)
        done.write_text(json.dumps({"url": url, "dest": str(dest)}) + "\n", encoding="utf-8")
    if ds.known_corrupt and ds.corrupt_list:
        lst = data_root / ds.corrupt_list
        with atomic_path(lst) as tmp:
            tmp.write_text("".join(f"{n}\tknown corrupt (publisher's archive)\n"
                                   for n in ds.known_corrupt), encoding="utf-8")
        report.append(f"{len(ds.known_corrupt)} known corrupt images listed in {lst}")
    if ds.note:
        report.append(f"note: {ds.note}")
    return report


def main(argv: list[str] | None = None) -> None:
    from lib.cli import run_main, setup_logging
    from lib.settings import REPO_ROOT

    names = sorted(REGISTRY)
    p = argparse.ArgumentParser(
        prog="download.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", choices=[*names, "all"], help="what to download")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where to put the data (default: $BLCF_DATA_ROOT or <repo>/data)")
    p.add_argument("--mirror", default=None, metavar="URL",
                   help="fetch every file from URL/<file name> instead of its origin")
    p.add_argument("--list", action="store_true", help="list the datasets and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        if args.list or not args.dataset:
            for n in names:
                print(f"{n:12s} {REGISTRY[n].description}")
            return 0
        root = Path(args.data_root or os.environ.get("BLCF_DATA_ROOT") or REPO_ROOT / "data")
        todo = names if args.dataset == "all" else [args.dataset]
        for n in todo:
            for line in fetch_dataset(REGISTRY[n], root, mirror=args.mirror):
                print(f"{n}: {line}")
        return 0

    run_main(body, "download")


if __name__ == "__main__":
    main()
