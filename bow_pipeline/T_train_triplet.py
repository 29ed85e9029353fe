#!/usr/bin/env python
"""Optional step T: fine-tune the backbone with an R-MAC head and a triplet loss.

Reads a training list (``--train`` or the settings key ``train_json``: JSON
``{"root": DIR, "images": [{"path": ..., "class": ...}]}``) and the backbone of the
settings; writes the checkpoint ``train_checkpoint`` (default <path_models>/triplet.pt),
which step A and D_rankings_Pooling load with ``"weights": "file"``. Rerunning resumes
after the last finished epoch. Details: lib/learned/step.py.
"""

from __future__ import annotations

from pathlib import Path

from lib.cli import make_parser, run_step


def main() -> None:
    p = make_parser("T_train_triplet.py", __doc__)
    p.add_argument("--train", type=Path, default=None,
                   help="training list JSON (overrides the settings key train_json)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (settings: epochs)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (settings: lr)")
    p.add_argument("--margin", type=float, default=None, help="loss margin (settings: margin)")
    args = p.parse_args()
    for key in ("epochs", "lr", "margin"):  # these options are settings overrides
        if getattr(args, key) is not None:
            args.overrides.append(f"{key}={getattr(args, key)}")
    if args.train is not None:
        args.overrides.append(f"train_json={args.train.resolve()}")

    def call(settings):
        from lib.learned.step import fine_tune

        return fine_tune(settings)

    run_step(args, "T", call)


if __name__ == "__main__":
    main()
