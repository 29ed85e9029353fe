"""Step D (baseline): rankings by global pooling of the stored feature maps.

Inputs: step A's feature store (its metadata must match the settings' network, layers,
input size ...), the ground truth's queries and images. No PCA or codebook of step B.

Work: each database image's maps (layers concatenated at the first layer's native size)
are pooled into one vector (``pooling``: sum = SPoC / the paper's uCroW, max = MAC,
gem = GeM with exponent ``gem_p``, rmac = R-MAC with ``rmac_levels`` scales), then
L2 -> PCA-whitening fit on the database vectors (``pooling_pca``, ``pca_dim`` capped at
the number of images - 1, ``whiten``) -> L2. Queries go through the same network; their
maps are multiplied by the ``masking`` weights (1: the box mask resized bilinearly, not
thresholded; 2: the box in whole cells; 3: distance-transform weights) before pooling.
Ranking is by cosine similarity, ties in database order.

Outputs: <path_output>/pooling_<pooling>/ (a ranking folder, the same format as bow/:
queries.txt, lists/<query>.txt, scores.npy, ranking.json), for step E to evaluate.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from lib.cli import load_from_args, make_parser, run_main, setup_logging

log = logging.getLogger("blcf.D")


def main() -> None:
    p = make_parser("D_rankings_Pooling.py", __doc__ or "")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from lib.artefacts import output_lock
        from lib.groundtruth.loader import load_ground_truth
        from lib.search.queries import pooling_rankings

        s = load_from_args(args)
        gt = load_ground_truth(s)
        out = Path(s.path_output)
        folder = out / f"pooling_{s.pooling}"
        t0 = time.perf_counter()
        with output_lock(out, "D_pooling"):
            res = pooling_rankings(s, gt, folder, progress=tqdm)
        print(f"D_Pooling: {len(gt.queries)} queries, {s.pooling} pooling, "
              f"{res['dim']}-D vectors, masking {s.masking}, in "
              f"{time.perf_counter() - t0:.1f} s ({res['ms_per_query']['total']:.1f} "
              f"ms/query) -> {folder}")
        return 0

    run_main(body, "D_pooling")


if __name__ == "__main__":
    main()
