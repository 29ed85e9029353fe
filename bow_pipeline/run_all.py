#!/usr/bin/env python
"""Run steps A to E in order for one settings file, skipping up-to-date steps.

Each step runs as its own command (exactly what a user would type), with the same
``--set``/``--data-root``/``--runs-root`` arguments. A step is skipped when
``<path_output>/run_state.json`` says it finished with the same settings (for every key
that affects it) and its outputs exist; after a step has run, every later step runs too.
Prints one progress line per step and the final mAP.
"""

from __future__ import annotations

from pathlib import Path

from lib.cli import load_from_args, make_parser, run_main, setup_logging
from lib.pipeline import run_all


def main() -> None:
    p = make_parser("run_all.py", __doc__)
    p.add_argument("--force", default="", help="steps to rerun even if up to date, e.g. BD")
    p.add_argument("--only", default="", help="run only these steps, e.g. DE")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        s = load_from_args(args)
        passthrough: list[str] = []
        for o in args.overrides:
            passthrough += ["--set", o]
        if args.data_root:
            passthrough += ["--data-root", str(args.data_root)]
        if args.runs_root:
            passthrough += ["--runs-root", str(args.runs_root)]
        if args.quiet:
            passthrough.append("--quiet")
        res = run_all(s, passthrough, force=list(args.force.upper()),
                      only=list(args.only.upper()) or None)
        if res:
            print(f"{s.dataset}: mAP {res['map']:.4f} over {res['n_queries']} queries; "
                  f"results in {Path(s.path_output) / 'bow'}")
        return 0

    run_main(body, "run_all")


if __name__ == "__main__":
    main()
