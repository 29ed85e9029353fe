"""datasets/download.py against a loopback HTTP server serving archives built here:
download + verify + unpack, resume after the server cuts a transfer, and rejection of
corrupt, mismatching and unsafe archives with nothing left unpacked."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datasets.download import REGISTRY, Dataset, Resource, download, fetch_dataset, main
from lib.errors import UserError


class _Server:
    """Serves ``files`` (path -> bytes) with Range support; paths in ``cut`` are cut
    off half-way on their first full request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.ranges: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                data = outer.files.get(self.path)
                rng = self.headers.get("Range")
                outer.ranges.append((self.path, rng))
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng[len("bytes="):].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.cut and not rng:
                    outer.cut.discard(self.path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.stop()


def _tarball(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


IMAGES = {f"oxbuild/img_{i:03d}.jpg": bytes([i]) * (3000 + i) for i in range(12)}


def test_fetch_verify_unpack_and_rerun(server: _Server, tmp_path: Path) -> None:
    tgz = _tarball(IMAGES)
    gnd = pickle.dumps({"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": [0, 0, 1, 1]}]})
    server.files["/imgs.tgz"] = tgz
    server.files["/gnd_toy.pkl"] = gnd
    ds = Dataset("toy", "toy", (
        Resource("http://origin.invalid/data/imgs.tgz", "toy/images", flatten=True,
                 sha256=hashlib.sha256(tgz).hexdigest()),
        Resource("http://origin.invalid/data/gnd_toy.pkl", "toy/gnd_toy.pkl", archive=False,
                 md5=hashlib.md5(gnd).hexdigest()),
    ))
    lines = fetch_dataset(ds, tmp_path, mirror=server.base, timeout=5)
    imgs = tmp_path / "toy" / "images"
    assert sorted(p.name for p in imgs.iterdir()) == sorted(Path(n).name for n in IMAGES)
    assert (imgs / "img_005.jpg").read_bytes() == IMAGES["oxbuild/img_005.jpg"]
    assert (tmp_path / "toy" / "gnd_toy.pkl").read_bytes() == gnd
    assert lines[0] == f"imgs.tgz: 12 files -> {imgs}"
    again = fetch_dataset(ds, tmp_path, mirror=server.base, timeout=5)
    assert all("already installed" in ln for ln in again)


def test_resume_after_cut(server: _Server, tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    server.files["/big.bin"] = data
    server.cut.add("/big.bin")
    out = download(f"{server.base}/big.bin", tmp_path / "big.bin", timeout=5)
    assert out.read_bytes() == data and not (tmp_path / "big.bin.part").exists()
    ranges = [r for p, r in server.ranges if p == "/big.bin"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(data) // 2}-"


def test_resume_across_runs(server: _Server, tmp_path: Path) -> None:
    data = b"x" * 50_000
    server.files["/f.bin"] = data
    server.cut.add("/f.bin")
    with pytest.raises(UserError, match="rerun the same command to resume"):
        download(f"{server.base}/f.bin", tmp_path / "f.bin", timeout=5, retries=0)
    assert (tmp_path / "f.bin.part").stat().st_size == len(data) // 2
    assert download(f"{server.base}/f.bin", tmp_path / "f.bin", timeout=5).read_bytes() == data
    assert server.ranges[-1] == ("/f.bin", f"bytes={len(data) // 2}-")


def _assert_nothing_unpacked(root: Path, dest: str) -> None:
    assert not (root / dest).exists()
    leftovers = [p for p in (root / dest).parent.glob(".*")] if (root / dest).parent.exists() \
        else []
    assert leftovers == []


def test_corrupt_archive_rejected(server: _Server, tmp_path: Path) -> None:
    tgz = _tarball(IMAGES)
    server.files["/bad.tgz"] = tgz[: len(tgz) * 2 // 3]  # truncated, no checksum known
    ds = Dataset("bad", "bad", (Resource(f"{server.base}/bad.tgz", "bad/images",
                                         flatten=True),))
    with pytest.raises(UserError, match="bad.tgz: corrupt or truncated archive .*nothing "
                                        "unpacked"):
        fetch_dataset(ds, tmp_path, timeout=5)
    _assert_nothing_unpacked(tmp_path, "bad/images")
    assert not (tmp_path / "downloads" / "bad.tgz").exists()  # fetched afresh next time
    # the fixed archive then installs, and its sha256 is recorded for later downloads
    server.files["/bad.tgz"] = tgz
    fetch_dataset(ds, tmp_path, timeout=5)
    sums = json.loads((tmp_path / "downloads" / "checksums.json").read_text())
    assert sums["bad.tgz"] == hashlib.sha256(tgz).hexdigest()


def test_checksum_mismatch_rejected(server: _Server, tmp_path: Path) -> None:
    server.files["/imgs.tgz"] = _tarball(IMAGES)
    ds = Dataset("x", "x", (Resource(f"{server.base}/imgs.tgz", "x/images", md5="0" * 32),))
    with pytest.raises(UserError, match="imgs.tgz: md5 checksum mismatch"):
        fetch_dataset(ds, tmp_path, timeout=5)
    _assert_nothing_unpacked(tmp_path, "x/images")
    assert not (tmp_path / "downloads" / "imgs.tgz").exists()


@pytest.mark.parametrize("members, links, match", [
    ({"ok.jpg": b"1", "../evil.jpg": b"2"}, None, "unsafe member path '../evil.jpg'"),
    ({"/etc/evil.jpg": b"2"}, None, "unsafe member path"),
    ({"ok.jpg": b"1"}, {"link.jpg": "/etc/passwd"}, "link or special file"),
])
def test_unsafe_archive_rejected(server: _Server, tmp_path: Path, members, links,
                                 match: str) -> None:
    server.files["/evil.tgz"] = _tarball(members, links)
    ds = Dataset("e", "e", (Resource(f"{server.base}/evil.tgz", "e/images"),))
    with pytest.raises(UserError, match=match):
        fetch_dataset(ds, tmp_path, timeout=5)
    _assert_nothing_unpacked(tmp_path, "e/images")
    assert not (tmp_path / "evil.jpg").exists()


def test_registry_and_list(capsys) -> None:
    assert REGISTRY["revisited"].resources[0].md5 == "f2b67579f625a587b5b0828dbf2e8eb0"
    assert REGISTRY["revisited"].resources[1].md5 == "2feae0a8257a5c6ca1b31b8eb73c8571"
    assert len(REGISTRY["paris6k"].known_corrupt) == 20
    assert len(REGISTRY["revisitop1m"].resources) == 100
    with pytest.raises(SystemExit) as ex:
        main(["--list"])
    assert ex.value.code == 0
    assert "oxford5k" in capsys.readouterr().out
