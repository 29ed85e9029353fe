#!/usr/bin/env python
"""Optional step T: fine-tune the backbone with an R-MAC head and a triplet loss.

Input: a training list (``--train`` or the settings key ``train_json``), JSON
``{"root": DIR, "images": [{"path": ..., "class": ...}]}`` (lib/learned/training_data.py; clean a
noisy one first with datasets/clean_noisy.py). Network, weights, input size and resize
rule come from the settings, as in step A; the head pools ``train_layer`` (default: the
last of ``layers``) on ``rmac_levels`` scales into ``train_dim`` dimensions.

What it does: decodes the images once; fits the head's linear layer as the
PCA-whitening of the training images' region vectors; then per epoch re-mines hard
negatives with the current model (the most similar images of other classes; the
negative is drawn among the ``neg_pool`` hardest), trains on one triplet per image with
loss max(0, margin + |a-p|² - |a-n|²) (Adam, ``lr``), and writes the checkpoint.

Output: ``train_checkpoint`` (default ``<path_models>/triplet.pt``), format
``blcf-checkpoint-1`` (tensors and plain types, torch.load(weights_only=True) reads it):
network, backbone state_dict, head_state_dict, preprocessing, meta (layer, channels,
dim, L, training list hash, config, per-epoch history), optimizer state, epoch. Rerunning
resumes after the last finished epoch (raise ``epochs`` to train longer). Use it in step
A and D_rankings_Pooling with ``"weights": "file", "weights_file": <checkpoint>``.
CUDA is used when present (``device``); that path is untested here (CPU only).
"""

from __future__ import annotations

from pathlib import Path

from lib.cli import load_from_args, make_parser, run_main, setup_logging


def main() -> None:
    p = make_parser("T_train_triplet.py", __doc__)
    p.add_argument("--train", type=Path, default=None,
                   help="training list JSON (overrides the settings key train_json)")
    p.add_argument("--epochs", type=int, default=None, help="total epochs (settings: epochs)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (settings: lr)")
    p.add_argument("--margin", type=float, default=None, help="loss margin (settings: margin)")
    args = p.parse_args()
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from lib.learned.triplet import run_training

        for key in ("epochs", "lr", "margin"):
            if getattr(args, key) is not None:
                args.overrides.append(f"{key}={getattr(args, key)}")
        if args.train is not None:
            args.overrides.append(f"train_json={args.train.resolve()}")
        settings = load_from_args(args)
        res = run_training(settings)
        h = res["history"][-1] if res["history"] else {}
        print(f"T: {res['images']} images in {res['classes']} classes, epoch "
              f"{res['epoch']}/{settings.epochs}, last loss {h.get('loss', float('nan')):.4f}, "
              f"{h.get('seconds', 0.0):.0f} s/epoch on {res['device']} -> {res['checkpoint']}")
        return 0

    run_main(body, "T")


if __name__ == "__main__":
    main()
