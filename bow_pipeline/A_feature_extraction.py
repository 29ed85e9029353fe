#!/usr/bin/env python
"""Step A: local CNN feature maps of every database image, into an LMDB feature store.

Reads the database images named by the ground truth and the backbone of the settings;
writes <path_features>/<network>-<weights>-<layers>-<H>x<W>-<resize>.lmdb (and
<same name>.corrupted.txt for unreadable images). Rerunning resumes; a store made with
other feature settings is refused. Details: lib/features/step.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    args = make_parser("A_feature_extraction.py", __doc__).parse_args()

    def call(settings):
        from lib.features.step import extract_features

        return extract_features(settings)

    run_step(args, "A", call)


if __name__ == "__main__":
    main()
