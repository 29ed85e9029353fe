"""Search a finished run with new photos: ranks the database for each IMAGE exactly as
step D ranks a query (the same code: the settings' masking with --box, augmentation,
re-ranking with localisation, query expansion) and prints the top K database images,
their scores and, with re-ranking, the box of the object in each.

Needs the models of step B and the index of step C (a run that has not reached step C
is refused with the step to run). The photos need not belong to the dataset. --json
prints one document: {"settings", "dataset", "n_db", "top", "queries": [{"query",
"image_size", "box", "n_db", "results": [{"rank", "image_id", "score", "box",
"window_score", "width", "height"}], "timings_ms"}]}; see docs/search.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from lib.cli import load_from_args, make_parser, run_main, setup_logging


def main() -> None:
    p = make_parser("search.py", __doc__ or "")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="query photo(s)")
    p.add_argument("--box", type=float, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"),
                   help="query box in pixels of the photo as displayed (every IMAGE)")
    p.add_argument("--top", type=int, default=10, metavar="K", help="results shown (10)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        # imported here, not at the top: --help and bad arguments need no torch
        from lib.service.query_service import QueryService, parse_box

        settings = load_from_args(args, resolve_auto=True)
        box = parse_box(args.box)
        with QueryService(settings, warm=False) as svc:
            answers = svc.search_files(args.images, box, args.top)
        if args.json:
            doc = {"settings": str(settings.source), "dataset": settings["dataset"],
                   "n_db": svc.n_db, "top": args.top,
                   "queries": [a.to_json() for a in answers]}
            print(json.dumps(doc, indent=1))
        else:
            print("\n\n".join(a.to_text() for a in answers))
        return 0

    run_main(body, "search")


if __name__ == "__main__":
    main()
