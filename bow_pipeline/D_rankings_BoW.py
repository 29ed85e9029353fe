"""Step D: BoW rankings of the queries (global or local search, re-ranking, QE).

Inputs (path_output): step B's models, step C's assignment store and inverted file, the
ground truth's queries and their images (path_queries, default path_images); artefacts
made with other settings are refused with the field named. Query assignment maps are
cached in <path_output>/query_words.lmdb, keyed by each query file's content.

Outputs: <path_output>/bow/ (a ranking folder): queries.txt, lists/<query>.txt (every
database id, best first), scores.npy (float32 n_queries x n_db, database order),
ranking.json and, with re-ranking, localisations.json. Details: lib/search/step.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    args = make_parser("D_rankings_BoW.py", __doc__ or "").parse_args()

    def call(settings):
        # imported here, not at the top: --help and bad arguments need no torch
        from lib.search.step import rank_bow

        return rank_bow(settings)

    run_step(args, "D", call)


if __name__ == "__main__":
    main()
