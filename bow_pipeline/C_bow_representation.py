"""Step C: assignment maps and the inverted file of the database.

Reads step A's feature store, step B's models (path_models) and the ground truth's
database order; with stream_distractors, also the distractor images (only their word
maps are kept). Writes into path_output: assignments.lmdb/ (a word map per image),
assignments.corrupted.txt (streaming only) and index/ (the inverted file). Resumes;
models or stores made with other settings are refused. Details: lib/index/step.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    args = make_parser("C_bow_representation.py", __doc__ or "").parse_args()

    def call(settings):
        from lib.index.step import build_index

        return build_index(settings)

    run_step(args, "C", call)


if __name__ == "__main__":
    main()
