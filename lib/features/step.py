"""Step A's entry point: local CNN feature maps of every database image, into an LMDB
feature store (``bow_pipeline/A_feature_extraction.py`` is its command line).

Input: the settings' database images (the ground truth's database list, gt_format +
path_gt + path_images, plus path_distractors unless stream_distractors is true: then
step C streams them and keeps only their word maps), the backbone (network, weights,
weights_file, layers) and the resize rule (resize, input_size, max_side, antialias).
Portrait images (taller than wide) go in at input_size (e.g. 336x256), all others,
squares included, at its transpose (256x336); resize = max_side keeps the aspect ratio.

Output: <path_features>/<network>-<weights>-<layers>-<H>x<W>-<resize>.lmdb, an LMDB
folder: key = image id, value = header (magic LCF2, dtype, number of layers, original
H0 and W0) + per layer (C, h, w) + the maps in feature_dtype (float16 by default) + a
CRC-32 trailer;
a __meta__ record (feature provenance, count, settings hash, library versions).
Unreadable images are listed in <same name>.corrupted.txt (image_id<TAB>reason) and
skipped. Rerunning skips stored images; an interrupted run resumes and ends with exactly
the store of an uninterrupted run. A store made with other feature settings is refused
with the field named.

Speed: decoding runs in num_workers DataLoader processes; batch_size images per
forward pass; CUDA when present (device), fp16/bf16 via precision (CUDA only).
"""

from __future__ import annotations

import time
from pathlib import Path

from lib.pipeline import StepResult
from lib.settings import Settings


def extract_features(settings: Settings, stop_after_batches: int | None = None
                     ) -> StepResult:
    """Step A on validated settings, under the output lock. ``stop_after_batches``
    simulates an interruption (tests; see :func:`lib.features.extraction.run_extraction`).
    Raises UserError for what the user can fix (ground truth, a mismatching store, ...)."""
    from lib.artefacts import output_lock
    from lib.features.extraction import run_extraction
    from lib.features.feature_store import FeatureStore
    from lib.groundtruth.loader import DISTRACTOR_PREFIX, load_ground_truth

    t0 = time.perf_counter()
    ids = load_ground_truth(settings).db_ids
    if settings["stream_distractors"]:  # step C streams them: no float maps on disk
        ids = [i for i in ids if not i.startswith(DISTRACTOR_PREFIX)]
    from lib.vocabulary.sizing import check_codebook_size  # n_centers vs the sample, early
    check_codebook_size(settings, len(ids))
    from lib.features.scales import at_scale, extra_scales

    # scale 1 first, then each extra scale into its own store (``scales``)
    runs = [settings] + [at_scale(settings, sc) for sc in extra_scales(settings)]
    results = []
    with output_lock(settings["path_output"], "A"):
        for st in runs:
            results.append(run_extraction(st, ids, FeatureStore.path_for(st),
                                          stop_after_batches=stop_after_batches))
            if results[-1]["interrupted"]:
                break
    lines = []
    for st, r in zip(runs, results):
        scale = "" if st is settings else f" (scale {st['input_size'][0]}x{st['input_size'][1]})"
        lines.append(f"A: {r['extracted']} extracted, {r['skipped']} already stored, "
                     f"{r['corrupt']} corrupt, {r['images_per_s']:.1f} images/s on "
                     f"{r['device']} ({r['seconds']:.1f} s){scale} -> {r['store']}")
    r = results[0]
    counts = {k: r[k] for k in ("extracted", "skipped", "corrupt", "count", "images_per_s",
                                "device")}
    counts["interrupted"] = any(x["interrupted"] for x in results)
    if len(results) > 1:
        counts["scales_extracted"] = [x["extracted"] for x in results]
    return StepResult("A", "\n".join(lines), tuple(Path(x["store"]) for x in results),
                      counts, time.perf_counter() - t0)
