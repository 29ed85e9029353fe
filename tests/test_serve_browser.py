"""serve.py's page in a real headless browser (Debian's chromium, driven as
tests/test_report.py drives it: ``--dump-dom`` and ``--screenshot``), against a real
threaded server: the page uploads a dataset query's photo through its upload path, draws
the box, searches, and shows the result thumbnails with their localisation boxes; the
query browser frames results by their ground truth. Skipped without chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers_pipeline import load
from tests.test_search_command import finished_run, query_file

pytest.importorskip("flask")

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium")
                                        .exists() else None)
BOX = "214,81,320,230"
YELLOW = (255, 212, 0)  # the localisation boxes (style.css)
CYAN = (0, 229, 255)  # the query box


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # virtual time lets the page finish its fetches before the DOM is dumped
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'chrome-profile'}",
         "--virtual-time-budget=30000", *args],
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium) - "
                    "browser check skipped")
    import torch
    from werkzeug.serving import make_server

    from lib.service.query_service import QueryService
    from lib.service.web import create_app

    run = finished_run(tmp_path_factory)
    torch.set_num_threads(1)
    with QueryService(load(run)) as svc:
        srv = make_server("127.0.0.1", 0, create_app(svc), threaded=True)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{srv.server_port}", svc, run
        finally:
            srv.shutdown()
            srv.server_close()
            thread.join(10)


def _figures(dom: str) -> list[dict[str, str]]:
    out = []
    for tag in re.findall(r"<figure [^>]*>", dom):
        out.append(dict(re.findall(r'([\w-]+)="([^"]*)"', tag)))
    return out


def test_upload_draw_box_and_see_results(server, tmp_path) -> None:
    base, svc, run = server
    url = f"{base}/?demo_query=0&box={BOX}&top=6"
    r = _chromium(tmp_path, "--dump-dom", url)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'data-state="done"' in dom, dom[-3000:]
    figs = [f for f in _figures(dom) if "data-image-id" in f]
    [want] = svc.search_files([query_file(run, "query_0")],
                              tuple(float(c) for c in BOX.split(",")), 6)
    assert [f["data-image-id"] for f in figs] == [x["image_id"] for x in want.results]
    assert all("data-box" in f for f in figs)  # re-ranking localised every one
    assert dom.count('class="loc-box"') == len(figs)
    assert f"box [{BOX.replace(',', ', ')}]" in dom  # the box drawn on the query

    shot = tmp_path / "page.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1300,900", url)
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    for colour in (YELLOW, CYAN):  # the boxes were painted
        assert (np.abs(a - colour).sum(-1) < 40).sum() > 100, colour


def test_query_browser_frames_by_ground_truth(server, tmp_path) -> None:
    base, svc, _ = server
    r = _chromium(tmp_path, "--dump-dom", f"{base}/?view=queries&query=0&top=10")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'data-state="done"' in dom, dom[-3000:]
    q = svc.ground_truth().queries[0]
    figs = [f for f in _figures(dom) if "data-image-id" in f]
    assert len(figs) == 10
    for f in figs:
        label = f["class"].split()[-1]
        iid = f["data-image-id"]
        assert label == ("positive" if iid in q.positives else
                         "junk" if iid in q.junk else "negative"), f
    assert "AP 0." in dom or "AP 1." in dom
