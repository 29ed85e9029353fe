"""Latency and throughput of searching a finished run with a new photo (issue 17):
``bow_pipeline/search.py`` / ``serve.py``'s query service on the SMVS DVD run.

1. **Same ranking as step D** (the CI-style check): for ``--check`` queries, the photo
   file searched as ``search.py`` does (a photo inside the image root is the database
   image, as step D takes it) gives exactly step D's list ``bow/lists/<query>.txt``.
   The same photos sent as uploads (bytes: always through the network) are compared too:
   how many lists are identical, and the agreement of the top 10.
2. **Latency**, request to answer, per query photo sent as bytes (decoding included),
   split into decode, extract (network), assign (PCA + nearest word), search (inverted
   file), rerank, qe; median and 95th percentile over the queries, for each torch thread
   count in ``--threads`` (rotated query by query, so load from other processes hits
   them alike).
3. **Throughput** of the threaded web server (werkzeug, ephemeral port): requests per
   second of 1 client and of ``--clients`` concurrent clients, alternated ``--rounds``
   times; the ratio of medians.

    .venv/bin/python benchmarks/bench_search_latency.py                 # settings/smvs_dvd.json
    .venv/bin/python benchmarks/bench_search_latency.py --queries 100 --check 20

Needs the finished SMVS run (runs/smvs_dvd, steps A-D with settings/smvs_dvd.json); writes
benchmarks/results/search_latency.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
STAGES = ("decode", "extract", "assign", "vector", "search", "rerank", "qe", "total")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


def check_same_as_step_d(svc, gt, bow: Path, paths: dict[str, Path], n: int) -> dict:
    """Step D's lists against the command's answer (file path) and an upload's."""
    same_file, same_upload, top10 = 0, 0, []
    for q in gt.queries[:n]:
        want = (bow / "lists" / f"{q.name}.txt").read_text().split()
        [a] = svc.search_files([paths[q.name]], q.bbox, svc.n_db)
        same_file += [r["image_id"] for r in a.results] == want
        b = svc.search_bytes(paths[q.name].read_bytes(), paths[q.name].name, q.bbox, svc.n_db)
        got = [r["image_id"] for r in b.results]
        same_upload += got == want
        top10.append(len(set(got[:10]) & set(want[:10])) / 10)
    return {"queries": n, "file_identical_to_step_d": same_file,
            "upload_identical_to_step_d": same_upload,
            "upload_top10_agreement": round(float(np.mean(top10)), 4)}


def latency(svc, gt, paths: dict[str, Path], n: int, threads: list[int]) -> dict:
    import torch

    per: dict[int, dict[str, list[float]]] = {t: {k: [] for k in STAGES} for t in threads}
    for i, q in enumerate(gt.queries[:n]):
        data = paths[q.name].read_bytes()
        for j in range(len(threads)):
            t = threads[(i + j) % len(threads)]
            torch.set_num_threads(t)
            t0 = time.perf_counter()
            res = svc.search_bytes(data, paths[q.name].name, q.bbox, 10)
            wall = (time.perf_counter() - t0) * 1000.0
            for k in STAGES:
                per[t][k].append(wall if k == "total" else res.timings_ms.get(k, 0.0))
    return {str(t): {k: {"median_ms": round(statistics.median(v), 2),
                         "p95_ms": round(pct(v, 95), 2)} for k, v in d.items()}
            for t, d in per.items()}


def throughput(svc, gt, paths: dict[str, Path], clients: int, requests: int,
               rounds: int) -> dict:
    from werkzeug.serving import make_server

    from lib.service.web import create_app

    server = make_server("127.0.0.1", 0, create_app(svc), threaded=True)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{server.server_port}/api/search"
    bodies = []
    for q in gt.queries[:requests]:
        b = uuid.uuid4().hex
        body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\""
                f"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + \
            paths[q.name].read_bytes() + f"\r\n--{b}--\r\n".encode()
        bodies.append((b, body))

    def post(k: int) -> None:
        b, body = bodies[k % len(bodies)]
        req = urllib.request.Request(url, data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={b}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()

    def rate(n_clients: int) -> float:
        nxt = iter(range(requests))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    k = next(nxt, None)
                if k is None:
                    return
                post(k)

        t0 = time.perf_counter()
        ws = [threading.Thread(target=worker) for _ in range(n_clients)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        return requests / (time.perf_counter() - t0)

    try:
        one, many = [], []
        for _ in range(rounds):
            one.append(rate(1))
            many.append(rate(clients))
    finally:
        server.shutdown()
        server.server_close()
    m1, mk = statistics.median(one), statistics.median(many)
    return {"requests": requests, "rounds": rounds, "clients": clients,
            "one_client_rps": [round(v, 2) for v in one],
            f"{clients}_clients_rps": [round(v, 2) for v in many],
            "ratio_of_medians": round(mk / m1, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=Path, default=REPO / "settings" / "smvs_dvd.json")
    p.add_argument("--runs-root", type=Path, default=None)
    p.add_argument("--queries", type=int, default=400, help="queries timed (400 = all)")
    p.add_argument("--check", type=int, default=20, help="queries checked against step D")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                   help="torch intra-op thread counts, rotated")
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads during the throughput test (default: first of "
                        "--threads)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=48, help="requests per throughput round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    import torch

    from lib.groundtruth.loader import image_path, load_ground_truth
    from lib.service.query_service import QueryService
    from lib.settings import load_settings

    s = load_settings(args.settings, runs_root=args.runs_root)
    if s["n_centers"] == "auto":  # the size step B chose, as search.py and serve.py read it
        from lib.vocabulary.sizing import resolve_from_codebook

        s = resolve_from_codebook(s)
    gt = load_ground_truth(s)
    paths = {q.name: image_path(s, q.image, query=True) for q in gt.queries}
    bow = Path(s["path_output"]) / "bow"
    out: dict = {"settings": str(args.settings), "n_db": len(gt.db_ids),
                 "cpu_count": __import__("os").cpu_count(),
                 "torch_threads_default": torch.get_num_threads()}
    t0 = time.perf_counter()
    with QueryService(s, max_concurrent=args.clients) as svc:
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["check"] = check_same_as_step_d(svc, gt, bow, paths, args.check)
        print("same as step D:", json.dumps(out["check"]), flush=True)
        out["latency"] = latency(svc, gt, paths, args.queries, args.threads)
        for t, d in out["latency"].items():
            print(f"latency, {t} torch thread(s): " + ", ".join(
                f"{k} {v['median_ms']:.1f}/{v['p95_ms']:.1f}" for k, v in d.items())
                + " ms (median/p95)", flush=True)
        torch.set_num_threads(args.server_threads or args.threads[0])
        out["throughput"] = throughput(svc, gt, paths, args.clients, args.requests,
                                       args.rounds)
        print("throughput:", json.dumps(out["throughput"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_latency.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
