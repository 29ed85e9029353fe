"""How much an ASMK signature says about a match: for a few queries, the Hamming
similarities of the words a query shares with its positives and with random negatives.

    .venv/bin/python benchmarks/bench_asmk_similarity.py settings/smvs_dvd.json \\
        --set path_output=RUN --set kernel=asmk [--queries 3]

RUN is a run folder whose step C ran with ``kernel = asmk``. Prints, per query and
image, the number of shared words, their mean similarity and the share of positive ones.
"""

from __future__ import annotations

import argparse

import numpy as np

from lib.groundtruth.loader import load_ground_truth
from lib.index.asmk import hamming, packed_bits
from lib.index.assignment_store import AssignmentStore
from lib.provenance import asmk_bits
from lib.search.query_encoding import QueryEncoder
from lib.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--negatives", type=int, default=3)
    a = ap.parse_args()
    s = load_settings(a.settings, overrides=a.overrides)
    gt = load_ground_truth(s)
    store = AssignmentStore(AssignmentStore.path_for(s))
    enc = QueryEncoder(s, store)
    b = packed_bits(asmk_bits(s, enc.codebook.dim))
    rng = np.random.default_rng(0)
    for q in gt.queries[: a.queries]:
        words, _ = enc.words(q.image)
        uw, sig, _ = enc.asmk_signature(q.image, None, words[0].shape)

        def shared(image: str, uw: np.ndarray = uw, sig: np.ndarray = sig) -> str:
            got = store.get_signature(image)
            if got is None:
                raise SystemExit(f"{image}: no signatures (run step C with kernel = asmk)")
            common, iq, idd = np.intersect1d(uw, got[0].astype(np.int32),
                                             return_indices=True)
            if not len(common):
                return "0 shared words"
            sim = 1 - 2 * hamming(sig[iq], got[1][idd]) / b
            return (f"{len(common)} shared words, mean similarity {np.mean(sim):+.3f}, "
                    f"{np.mean(sim > 0):.0%} positive")

        print(f"{q.name}")
        for p in sorted(q.positives):
            print(f"  positive {p}: {shared(p)}")
        negs = [i for i in gt.db_ids if i not in q.positives and i not in q.junk]
        for n in rng.choice(negs, a.negatives, replace=False):
            print(f"  negative {n}: {shared(str(n))}")
    enc.close()
    store.close()


if __name__ == "__main__":
    main()
