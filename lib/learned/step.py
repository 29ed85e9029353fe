"""Optional step T's entry point: fine-tune the backbone with an R-MAC head and a triplet
loss (``bow_pipeline/T_train_triplet.py`` is its command line).

Input: a training list (the settings key ``train_json``; the command line's ``--train``
sets it), JSON ``{"root": DIR, "images": [{"path": ..., "class": ...}]}``
(lib/learned/training_data.py; clean a noisy one first with datasets/clean_noisy.py).
Network, weights, input size and resize rule come from the settings, as in step A; the
head pools ``train_layer`` (default: the last of ``layers``) on ``rmac_levels`` scales
into ``train_dim`` dimensions.

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

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.pipeline import StepResult
from lib.settings import Settings


def fine_tune(settings: Settings, eval_fn: Callable[[Any], dict[str, float]] | None = None
              ) -> StepResult:
    """Step T on validated settings (:func:`lib.learned.triplet.run_training`, which takes
    the output lock); ``eval_fn`` is called on the model after each epoch (see there).
    ``counts``: images, classes, epoch, the per-epoch history and the device."""
    from lib.learned.triplet import run_training

    t0 = time.perf_counter()
    res = run_training(settings, eval_fn)
    h = res["history"][-1] if res["history"] else {}
    summary = (f"T: {res['images']} images in {res['classes']} classes, epoch "
               f"{res['epoch']}/{settings.epochs}, last loss {h.get('loss', float('nan')):.4f}, "
               f"{h.get('seconds', 0.0):.0f} s/epoch on {res['device']} -> {res['checkpoint']}")
    return StepResult("T", summary, (Path(res["checkpoint"]),), dict(res),
                      time.perf_counter() - t0)
