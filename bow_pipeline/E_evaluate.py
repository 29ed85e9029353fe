"""Step E: evaluate a ranking folder against the ground truth.

Reads a ranking folder written by D (--ranking; default <path_output>/bow; a relative
name such as pooling_sum is taken inside path_output) and the ground truth named by the
settings. Writes into that folder: map.txt (one AP per line in queries.txt order; a
query without positives is left out of it and of the mean, and named in results.json),
results.json (mAP, per-query AP, per-landmark or easy/medium/hard
blocks) and, when the settings say report = true, report/ (HTML). AP follows the Oxford
compute_ap rule. Details: lib/evaluation/step.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    p = make_parser("E_evaluate.py", __doc__ or "")
    p.add_argument("--ranking", default=None, metavar="DIR",
                   help="ranking folder to evaluate (default <path_output>/bow; a relative "
                        "name is taken inside path_output, e.g. pooling_sum)")
    args = p.parse_args()

    def call(settings):
        from lib.evaluation.step import evaluate_run

        return evaluate_run(settings, ranking=args.ranking)

    run_step(args, "E", call)


if __name__ == "__main__":
    main()
