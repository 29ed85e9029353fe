"""The web server of ``bow_pipeline/serve.py`` through its HTTP API: Flask's test client
(uploads, boxes, the dataset-query browser, thumbnails, every bad request answered with
one JSON line) and one real threaded werkzeug server on an ephemeral port answering
concurrent searches from several threads with the same results."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers_pipeline import load
from tests.test_search_command import finished_run, query_file

pytest.importorskip("flask")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory)


@pytest.fixture(scope="module")
def service(run):
    import torch

    from lib.service.query_service import QueryService

    torch.set_num_threads(1)
    with QueryService(load(run), max_concurrent=4) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service):
    from lib.service.web import create_app

    return create_app(service, max_upload_bytes=1 << 20).test_client()


def upload(client, path: Path, box: str | None = None, top: int | None = None,
           data: bytes | None = None, name: str | None = None):
    form = {"image": (io.BytesIO(path.read_bytes() if data is None else data),
                      name or path.name)}
    if box is not None:
        form["box"] = box
    if top is not None:
        form["top"] = str(top)
    return client.post("/api/search", data=form, content_type="multipart/form-data")


def test_page_and_its_files_are_local(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and b"<script src=\"/static/app.js\">" in r.data
    for name in ("app.js", "style.css"):
        s = client.get(f"/static/{name}")
        assert s.status_code == 200 and len(s.data) > 500
        code = s.data.replace(b'"http://www.w3.org/2000/svg"', b"")  # a namespace name
        assert b"http://" not in code and b"https://" not in code  # no CDN
    assert b"http" not in r.data.replace(b"http-equiv", b"")
    info = client.get("/api/info").get_json()
    assert info["dataset"] == "searchdemo" and info["n_db"] > 0
    assert info["limits"]["max_upload_bytes"] == 1 << 20


def test_upload_with_a_box_matches_the_command(run, client, service) -> None:
    q = query_file(run, "query_0")
    r = upload(client, q, box="214,81,320,230", top=5)
    assert r.status_code == 200, r.get_json()
    doc = r.get_json()
    [want] = service.search_files([q], (214, 81, 320, 230), 5)
    assert doc["results"] == want.to_json()["results"]
    assert doc["box"] == [214.0, 81.0, 320.0, 230.0] and doc["image_size"] == [320, 240]
    assert all(r["box"] is not None for r in doc["results"])
    whole = upload(client, q).get_json()  # no box: the whole photo, default top
    assert whole["box"] is None and len(whole["results"]) == 20


def test_dataset_query_browser(client, service) -> None:
    qs = client.get("/api/queries").get_json()["queries"]
    gt = service.ground_truth()
    assert [q["name"] for q in qs] == [q.name for q in gt.queries]
    doc = client.get("/api/queries/0?top=30").get_json()
    q = gt.queries[0]
    for r in doc["results"]:
        want = ("positive" if r["image_id"] in q.positives else
                "junk" if r["image_id"] in q.junk else "negative")
        assert r["label"] == want
    assert doc["box"] == list(q.bbox)
    assert 0.0 < doc["dataset_query"]["ap"] <= 1.0
    assert client.get("/api/queries/99").status_code == 400


def test_thumbnails(client, service) -> None:
    img_id = service.db_ids[0]
    r = client.get(f"/thumb/{img_id}?size=100")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(r.data)) as im:
        assert max(im.size) <= 160  # rounded up to the next served size
    big = client.get(f"/thumb/{img_id}?size=100000")
    with Image.open(io.BytesIO(big.data)) as im:
        assert max(im.size) <= 1024
    assert client.get("/thumb/not_an_image").status_code == 404
    assert client.get("/thumb/../../etc/passwd").status_code == 404
    assert client.get("/query_image/0?size=160").status_code == 200
    assert client.get("/query_image/0/file").status_code == 200


@pytest.mark.parametrize(("kind", "status", "needle"), [
    ("not_an_image", 400, "not an image"),
    ("empty", 400, "empty file"),
    ("no_field", 400, "multipart field 'image'"),
    ("too_large_upload", 413, "upload too large"),
    ("too_many_pixels", 400, "too large"),
    ("box_outside", 400, "lies outside the 320x240 image"),
    ("box_zero", 400, "zero or negative area"),
    ("box_text", 400, "expected four"),
    ("bad_top", 400, "top"),
])
def test_bad_requests_get_one_json_line(run, client, service, kind, status, needle) -> None:
    q = query_file(run, "query_0")
    if kind == "not_an_image":
        r = upload(client, q, data=b"<html>nope</html>", name="x.jpg")
    elif kind == "empty":
        r = upload(client, q, data=b"")
    elif kind == "no_field":
        r = client.post("/api/search", data={"box": "1,2,3,4"},
                        content_type="multipart/form-data")
    elif kind == "too_large_upload":
        r = upload(client, q, data=b"\xff" * (2 << 20))
    elif kind == "too_many_pixels":
        buf = io.BytesIO()
        Image.new("RGB", (4000, 3000)).save(buf, "PNG")
        old, service.max_pixels = service.max_pixels, 10_000_000
        try:
            r = upload(client, q, data=buf.getvalue(), name="huge.png")
        finally:
            service.max_pixels = old
    elif kind == "box_outside":
        r = upload(client, q, box="400,10,500,50")
    elif kind == "box_zero":
        r = upload(client, q, box="10,10,10,50")
    elif kind == "box_text":
        r = upload(client, q, box="a,b,c")
    else:
        r = upload(client, q, top=0)
    assert r.status_code == status
    err = r.get_json()["error"]
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_threaded_server_answers_concurrent_requests_alike(run, service) -> None:
    from werkzeug.serving import make_server

    from lib.service.web import create_app

    server = make_server("127.0.0.1", 0, create_app(service), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    photos = [query_file(run, f"query_{i}") for i in range(3)]

    def post(path: Path) -> dict:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"top\"\r\n\r\n8\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                f"filename=\"{path.name}\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + \
            path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(f"{base}/api/search", data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    try:
        want = {p.name: post(p)["results"] for p in photos}
        got: list[tuple[str, list]] = []
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for j in range(3):
                    p = photos[(k + j) % len(photos)]
                    got.append((p.name, post(p)["results"]))
            except BaseException as e:  # reported below, not lost in the thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(got) == 12
        for name, results in got:
            assert results == want[name], name
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{base}/api/queries/999", timeout=30)
        assert bad.value.code == 400
        assert "error" in json.loads(bad.value.read())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
