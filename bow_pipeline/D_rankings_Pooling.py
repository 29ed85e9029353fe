"""Step D (baseline): rankings by global pooling of the stored feature maps.

Inputs: step A's feature store (its metadata must match the settings), the ground
truth's queries and images; no model of step B. ``pooling``: sum (SPoC / uCroW), max
(MAC), gem (GeM, ``gem_p``) or rmac (R-MAC, ``rmac_levels``); then PCA-whitening fit on
the database (``pooling_pca``). Query maps are weighted by ``masking`` before pooling.

Outputs: <path_output>/pooling_<pooling>/ (a ranking folder, the same format as bow/:
queries.txt, lists/<query>.txt, scores.npy, ranking.json), for step E to evaluate.
Details: lib/search/step.py and lib/search/pooling.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    args = make_parser("D_rankings_Pooling.py", __doc__ or "").parse_args()

    def call(settings):
        # imported here, not at the top: --help and bad arguments need no torch
        from lib.search.step import rank_pooling

        return rank_pooling(settings)

    run_step(args, "D_pooling", call)


if __name__ == "__main__":
    main()
