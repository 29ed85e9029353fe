#!/usr/bin/env python
"""Run steps A to E in order for one settings file, skipping up-to-date steps.

Each step runs as its own command, on one snapshot of the validated settings
(``<path_output>/.run_all_settings.json``: every ``--set`` applied, paths absolute), so
editing the settings file meanwhile reaches no step. A step is skipped when
``<path_output>/run_state.json`` says it finished with the same settings and input files
(for everything that affects it) and its outputs exist; after a step has run, every later
step runs too.
Prints one line per step (``[i/5]`` and the step's summary, with its wall time), then
the final mAP; while a step runs, its progress bar shows; warnings show, the steps'
INFO logs and third-party loader messages only with -v. Details: lib/pipeline.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step, step_arguments


def main() -> None:
    p = make_parser("run_all.py", __doc__)
    p.add_argument("--force", default="", help="steps to rerun even if up to date, e.g. BD")
    p.add_argument("--only", default="", help="run only these steps, e.g. DE")
    args = p.parse_args()

    def call(settings):
        from lib.pipeline import run_all

        return run_all(settings, step_arguments(args), force=list(args.force.upper()),
                       only=list(args.only.upper()) or None)

    run_step(args, "run_all", call)


if __name__ == "__main__":
    main()
