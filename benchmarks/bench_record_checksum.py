"""Benchmark: what the per-record CRC-32 costs in the two LMDB stores, and what it
catches that the checks without it do not (issue "Reliability, second round", item 13).

Records (synthetic, realistic sizes): a feature-store record (``encode_record``: one
layer of 672 x 24 x 32 float16, ~1 MB, landscape and portrait) and an assignment record
(``assignment_store.encode``: a 64 x 48 uint16 word map, ~6 KB, with and without ~500
ASMK signatures of 16 bytes). Each is timed in the current format (``LCF2``, ``ASG3``,
``ASG4``: CRC-32 trailer, verified on decode) and in the format before it (``LCF1``,
``ASG1``, ``ASG2``: the same bytes without the trailer, decoded unverified), so that
``verify`` = decode - decode of the old format is the cost of the implemented check.
Timing is in alternating rotations (the order of the tasks shifts by one every
rotation; medians over rotations, and each ratio is the median of per-rotation ratios so
that load swings on a shared box cancel):

* the checksums alone: ``zlib.crc32``, ``zlib.adler32``, ``hashlib.blake2b(digest_size=8)``
  (the candidates compared before CRC-32 was chosen);
* decoding the record (``decode_record`` / ``decode`` + ``decode_signature``, verified,
  and ``*_v1``: the old format, unverified) and encoding it (``encode``, CRC-32 included);
* the work a step does per record: for a feature record, upsampling to 64 x 48
  (``upsample``), L2-PCA-L2 to 128-D (``maps_to_features``) and the nearest word among
  ``--k`` words (``Codebook.assign``, exact); for an assignment record,
  ``database_vector`` (centre prior). ``step*`` sums use the unverified decode, so the
  percentages are of the work without the check.

Then a fault injection: ``--flips`` random single-bit flips per record kind and format,
classified as caught by the decoder (``UserError``), caught later (non-finite feature
value, word id >= K, which ``bow_vector`` refuses) or silent.

    .venv/bin/python benchmarks/bench_record_checksum.py
    .venv/bin/python benchmarks/bench_record_checksum.py --k 25000 --repeats 15 \
        --out benchmarks/results/record_checksum_implemented.json

(``results/record_checksum.json`` is the measurement made before the trailer existed,
when ``decode`` was the unverified decode that is ``decode_v1`` here.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.features.feature_store import decode_record, encode_record
from lib.features.local_features import maps_to_features, oriented, upsample
from lib.index import assignment_store as asg
from lib.index.encoding import database_vector
from lib.vocabulary.codebook import Codebook
from lib.vocabulary.pca import PCAWhitening

MACHINE = "2-core x86_64 CPU, 24 GB RAM, no GPU"
CHECKSUMS: dict[str, Callable[[bytes], Any]] = {
    "crc32": zlib.crc32,
    "adler32": zlib.adler32,
    "blake2b8": lambda b: hashlib.blake2b(b, digest_size=8).digest(),
}


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
    """Calls per timed batch so that one batch lasts about ``target_s``."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    return max(1, int(target_s / one))


def rotate_time(tasks: dict[str, Callable[[], Any]], repeats: int,
                target_s: float) -> dict[str, list[float]]:
    """Seconds per call of each task, one sample per rotation; the task order shifts by
    one each rotation."""
    names = list(tasks)
    numbers = {n: _calibrate(tasks[n], target_s) for n in names}
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            fn, num = tasks[n], numbers[n]
            t = time.perf_counter()
            for _ in range(num):
                fn()
            out[n].append((time.perf_counter() - t) / num)
    return out


def summarise(samples: dict[str, list[float]], checks: list[str],
              refs: list[str]) -> dict[str, Any]:
    """Median times (µs) and, for each checksum, the median per-rotation ratio to each
    reference task (per cent)."""
    res: dict[str, Any] = {"median_us": {n: round(statistics.median(s) * 1e6, 2)
                                         for n, s in samples.items()}}
    ratios: dict[str, dict[str, float]] = {}
    for c in checks:
        ratios[c] = {}
        for ref in refs:
            rs = [a / b for a, b in zip(samples[c], samples[ref])]
            ratios[c][ref] = round(100 * statistics.median(rs), 3)
    res["checksum_pct_of"] = ratios
    return res


def random_pca(rng: np.random.Generator, d_in: int, d_out: int) -> PCAWhitening:
    q, _ = np.linalg.qr(rng.standard_normal((d_in, d_out)))
    var = np.sort(rng.random(d_out))[::-1] + 0.01
    return PCAWhitening(rng.random(d_in) * 0.01, q.T, var, whiten=True)


def feature_case(rng: np.random.Generator, shape: tuple[int, int, int],
                 new_dim: tuple[int, int], pca: PCAWhitening, codebook: Codebook | None,
                 repeats: int, target_s: float) -> dict[str, Any]:
    _, h, w = shape
    # ReLU-like maps: non-negative, ~half zeros
    maps = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0).astype(np.float16)
    rec = encode_record([maps], (h * 16, w * 16))
    old = v1(rec)
    decoded = decode_record(rec)[0][0]
    size = oriented(new_dim, h >= w)
    up = upsample(decoded, size)
    feats = maps_to_features(up, True, pca)
    tasks: dict[str, Callable[[], Any]] = {n: (lambda f=f: f(old)) for n, f in CHECKSUMS.items()}
    tasks["decode"] = lambda: decode_record(rec)
    tasks["decode_v1"] = lambda: decode_record(old)
    tasks["encode"] = lambda: encode_record([maps], (h * 16, w * 16))
    tasks["upsample"] = lambda: upsample(decoded, size)
    tasks["maps_to_features"] = lambda: maps_to_features(up, True, pca)
    refs = ["decode_v1", "encode", "upsample", "maps_to_features"]
    if codebook is not None:
        tasks["assign"] = lambda: codebook.assign(feats)
    samples = rotate_time(tasks, repeats, target_s)
    samples["verify"] = [a - b for a, b in zip(samples["decode"], samples["decode_v1"])]
    # the step's per-record work without the check (sum of its parts, per rotation)
    parts = ["decode_v1", "upsample", "maps_to_features"] + (["assign"] if codebook else [])
    samples["step_without_assign"] = [sum(v) for v in zip(*(samples[p] for p in parts[:3]))]
    refs.append("step_without_assign")
    if codebook is not None:
        samples["step"] = [sum(v) for v in zip(*(samples[p] for p in parts))]
        refs.append("step")
    out = summarise(samples, [*CHECKSUMS, "verify"], refs)
    out.update({"shape": list(shape), "record_bytes": len(rec), "record_bytes_v1": len(old),
                "upsampled_to": list(size), "n_features": int(feats.shape[0])})
    return out


def assignment_case(rng: np.random.Generator, k: int, n_sig: int, repeats: int,
                    target_s: float) -> dict[str, Any]:
    words = rng.integers(0, k, (64, 48)).astype(np.uint16)
    sig = None
    if n_sig:
        uw = np.sort(rng.choice(k, n_sig, replace=False)).astype(np.uint32)
        sig = (uw, rng.integers(0, 256, (n_sig, 16), dtype=np.uint8))
    rec = asg.encode(words, (1024, 768), sig)
    old = v1(rec)
    tasks: dict[str, Callable[[], Any]] = {n: (lambda f=f: f(old)) for n, f in CHECKSUMS.items()}
    tasks["decode"] = lambda: asg.decode(rec, "r")
    tasks["decode_v1"] = lambda: asg.decode(old, "r")
    refs = ["decode_v1"]
    if sig is not None:
        tasks["decode_signature"] = lambda: asg.decode_signature(rec, "r")
        tasks["decode_signature_v1"] = lambda: asg.decode_signature(old, "r")
        refs.append("decode_signature_v1")
    tasks["database_vector"] = lambda: database_vector(words, "centre_prior", k)
    refs.append("database_vector")
    samples = rotate_time(tasks, repeats, target_s)
    samples["verify"] = [a - b for a, b in zip(samples["decode"], samples["decode_v1"])]
    out = summarise(samples, [*CHECKSUMS, "verify"], refs)
    out.update({"map": [64, 48], "n_signatures": n_sig, "record_bytes": len(rec),
                "record_bytes_v1": len(old)})
    return out


def v1(rec: bytes) -> bytes:
    """``rec`` in the format before the CRC-32 trailer (old magic, trailer removed)."""
    old = {b"LCF2": b"LCF1", b"ASG3": b"ASG1", b"ASG4": b"ASG2"}[rec[:4]]
    return old + rec[4:-4]


def flip(buf: bytes, bit: int) -> bytes:
    b = bytearray(buf)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def _feature_flips(rec: bytes, bits: np.ndarray) -> dict[str, int]:
    count = {"caught_by_decode": 0, "non_finite_value": 0, "silent": 0}
    for bit in bits:
        try:
            m = decode_record(flip(rec, int(bit)))[0][0]
        except UserError:
            count["caught_by_decode"] += 1
            continue
        count["non_finite_value" if not np.isfinite(m).all() else "silent"] += 1
    return count


def _assignment_flips(rec: bytes, bits: np.ndarray, k: int) -> dict[str, int]:
    count = {"caught_by_decode": 0, "word_id_out_of_range": 0, "silent": 0}
    for bit in bits:
        bad = flip(rec, int(bit))
        try:
            wm = asg.decode(bad, "r")[0]
            suw = asg.decode_signature(bad, "r")[0]
        except UserError:
            count["caught_by_decode"] += 1
            continue
        oor = int(wm.max()) >= k or int(suw.max()) >= k
        count["word_id_out_of_range" if oor else "silent"] += 1
    return count


def fault_injection(rng: np.random.Generator, k: int, n: int) -> dict[str, Any]:
    """Single-bit flips at random positions: which ones does each format's decoder
    catch (the same positions in both, the trailer excluded)?"""
    maps = np.maximum(rng.standard_normal((672, 24, 32), dtype=np.float32), 0)
    frec = encode_record([maps.astype(np.float16)], (384, 512))
    words = rng.integers(0, k, (64, 48)).astype(np.uint16)
    uw = np.sort(rng.choice(k, 500, replace=False)).astype(np.uint32)
    arec = asg.encode(words, (1024, 768), (uw, rng.integers(0, 256, (500, 16), np.uint8)))
    fbits = rng.integers(0, (len(frec) - 4) * 8, n)
    abits = rng.integers(0, (len(arec) - 4) * 8, n)
    return {"flips_per_kind": n, "k": k,
            "feature_record": {"bytes": len(frec), **_feature_flips(frec, fbits)},
            "feature_record_v1": {"bytes": len(frec) - 4, **_feature_flips(v1(frec), fbits)},
            "assignment_record_with_signatures": {
                "bytes": len(arec), **_assignment_flips(arec, abits, k)},
            "assignment_record_with_signatures_v1": {
                "bytes": len(arec) - 4, **_assignment_flips(v1(arec), abits, k)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="rotations (default 15)")
    ap.add_argument("--k", type=int, default=25000,
                    help="words of the codebook for the assignment timing and the ids "
                         "(default 25000; 0 skips the nearest-word timing)")
    ap.add_argument("--batch-ms", type=float, default=20.0,
                    help="target length of one timed batch of calls (default 20 ms)")
    ap.add_argument("--flips", type=int, default=2000,
                    help="random single-bit flips per record kind (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import faiss
    import lmdb
    import torch

    rng = np.random.default_rng(args.seed)
    target = args.batch_ms / 1000
    pca = random_pca(rng, 672, 128)
    kw = max(args.k, 1)
    codebook = None
    if args.k:
        cents = rng.standard_normal((args.k, 128)).astype(np.float32)
        codebook = Codebook(cents / np.linalg.norm(cents, axis=1, keepdims=True))
    t0 = time.perf_counter()
    feats = {}
    for shape in ((672, 24, 32), (672, 32, 24)):
        key = "x".join(map(str, shape))
        feats[key] = feature_case(rng, shape, (64, 48), pca, codebook, args.repeats, target)
        print(f"feature record {key}: {json.dumps(feats[key])}", flush=True)
    assigns = {}
    for n_sig in (0, 500):
        key = f"64x48_sig{n_sig}"
        assigns[key] = assignment_case(rng, kw, n_sig, args.repeats, target)
        print(f"assignment record {key}: {json.dumps(assigns[key])}", flush=True)
    faults = fault_injection(rng, kw, args.flips)
    print(f"fault injection: {json.dumps(faults)}", flush=True)
    res = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": MACHINE,
        "command": "python benchmarks/bench_record_checksum.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": torch.__version__, "faiss": faiss.__version__,
                     "lmdb (py-lmdb)": lmdb.__version__,
                     "lmdb (C library)": ".".join(map(str, lmdb.version())),
                     "zlib": zlib.ZLIB_RUNTIME_VERSION},
        "settings": {"repeats": args.repeats, "k": args.k, "batch_ms": args.batch_ms,
                     "seed": args.seed, "pca": "672 -> 128, whitened",
                     "timer": "alternating rotations, medians; ratios = median of "
                              "per-rotation ratios"},
        "feature_records": feats,
        "assignment_records": assigns,
        "fault_injection": faults,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
