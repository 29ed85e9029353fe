"""Step D: BoW rankings of the queries (global or local search, re-ranking, QE).

Inputs (path_output): step B's models (path_models), step C's assignment store and
inverted file, the ground truth's queries and their images (path_queries, default
path_images). Every artefact's metadata must agree with the settings (network, layers,
input size, PCA, codebook, weighting, idf, database ids); otherwise D refuses with the
field named and the step to rerun.

Per query: its image (and, with ``augmentation`` 1-3, its flip / 1.5x centre crop /
flipped crop) goes through the same network, upsampling, PCA and codebook as the
database; the assignment maps are cached in <path_output>/query_words.lmdb. The query
vector follows ``masking``: 0 all words (GS), 1 words inside the box (mask resized
bilinearly, > 0.5; LS), 2 the box rounded outward to map cells, 3 distance-transform
weights. It is scored through the inverted file; then, in this order: spatial
re-ranking of the top ``top`` (``rerank``), query expansion with the top ``qe_top``
(``query_expansion``: gqe = their full-image vectors, lqe = their best windows), a new
search with the expanded query, and re-ranking of its top ``top`` again.

Outputs: <path_output>/bow/ (a ranking folder): queries.txt, lists/<query>.txt (every
database id, best first), scores.npy (float32 n_queries x n_db, database order),
ranking.json (settings, provenance, ms per query and stage) and, with re-ranking,
localisations.json (best window per re-ranked image, in original pixels).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from lib.cli import load_from_args, make_parser, run_main, setup_logging

log = logging.getLogger("blcf.D")


def main() -> None:
    p = make_parser("D_rankings_BoW.py", __doc__ or "")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from lib.artefacts import output_lock
        from lib.groundtruth.loader import load_ground_truth
        from lib.search.queries import bow_rankings

        s = load_from_args(args)
        gt = load_ground_truth(s)
        out = Path(s.path_output)
        t0 = time.perf_counter()
        with output_lock(out, "D"):
            res = bow_rankings(s, gt, out / "bow", progress=tqdm)
        dt = time.perf_counter() - t0
        print(f"D: {len(gt.queries)} queries ranked against {len(gt.db_ids)} images "
              f"(masking {s.masking}, augmentation {s.augmentation}, rerank {s.rerank}, "
              f"qe {s.query_expansion}) in {dt:.1f} s, "
              f"{res['ms_per_query']['total']:.1f} ms/query -> {out / 'bow'}")
        return 0

    run_main(body, "D")


if __name__ == "__main__":
    main()
