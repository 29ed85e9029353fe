"""Step E's entry point: evaluate a ranking folder against the ground truth
(``bow_pipeline/E_evaluate.py`` is its command line).

Inputs: a ranking folder written by D (``ranking``; default <path_output>/bow; a relative
name such as pooling_sum is taken inside path_output): queries.txt, lists/<query>.txt
(every database image id, best first), ranking.json; and the ground truth named by the
settings (gt_format, path_gt, path_images, path_distractors).
AP follows the Oxford compute_ap rule: junk entries are skipped (they advance neither rank
nor recall), trapezoid accumulation with the previous precision starting at 1, images
missing from a list are never retrieved. Revisited sets add Easy/Medium/Hard mAP and
mP@1/5/10 (queries without positives are left out of a mean); TRECVid is evaluated per
query image at shot level (best keyframe per shot; AP divides by all relevant shots).
An unknown image id, a missing list or a duplicate in a list stops with the file and
line named.
Outputs, in the ranking folder:
  map.txt       one AP per line in queries.txt order, no header; queries without
                positives are left out (as from the mean), so the file is all numbers
                and its mean is the mAP
  results.json  mAP, per-query AP, the queries without positives, per-landmark means
                (Oxford/Paris), easy/medium/hard blocks (revisited), shot-level AP
                (TRECVid), n_queries, the search mode of each query (box or whole
                image, and why), the settings that produced the lists (from
                ranking.json) and the folder name
  report/       the HTML report, when the settings say report = true
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from lib.artefacts import output_lock, write_json_atomic, write_text_atomic
from lib.errors import UserError
from lib.pipeline import StepResult
from lib.settings import Settings

log = logging.getLogger("blcf.E")


def ranking_dir(path_output: Path, ranking: str | None) -> Path:
    """The ranking folder: absolute as given, else inside path_output (default ``bow``)."""
    if not ranking:
        return Path(path_output) / "bow"
    p = Path(ranking).expanduser()
    return p if p.is_absolute() else Path(path_output) / p


def map_txt(results: dict[str, Any], queries: list[str]) -> str:
    """map.txt content: one AP per line in queries.txt order, queries without an AP (no
    positives) left out, so that the mean of the lines is the mAP and no ``nan`` breaks
    a reader; results.json names the left-out queries."""
    pq = results["per_query"]
    return "".join(repr(float(pq[q])) + "\n" for q in queries if pq[q] is not None)


WHOLE_IMAGE, BOX = "whole image", "box"


def search_mode(masking: int, query: Any) -> dict[str, str]:
    """What step D searched with for ``query`` under ``masking``: the box (or mask
    image) region, or the whole image; and why. Mirrors D's rule
    (``lib/search/query_encoding.py`` ``QueryEncoder.encode`` and
    ``lib/search/masks.py`` ``query_weights``): masking 0, or a query with neither a box
    nor a mask image, searches with every word of the photo."""
    if int(masking) == 0:
        return {"mode": WHOLE_IMAGE, "why": "masking=0"}
    if getattr(query, "mask", None) is not None:
        return {"mode": BOX, "why": f"mask image, masking={int(masking)}"}
    if query.bbox is None:
        return {"mode": WHOLE_IMAGE, "why": "no box in the ground truth"}
    return {"mode": BOX, "why": f"box, masking={int(masking)}"}


def search_modes(settings: Any, meta: dict[str, Any], queries: list[Any]) -> dict[str, Any]:
    """results.json's ``search_mode``: the masking D used (from ranking.json, else the
    settings, for lists made elsewhere) and :func:`search_mode` per query. Warns when a
    masking other than 0 met queries without a box: they fell back to the whole image."""
    used = (meta.get("settings") or {}).get("masking")
    source = "ranking.json" if used is not None else "settings"
    masking = int(used if used is not None else settings["masking"])
    per_query = {q.name: search_mode(masking, q) for q in queries}
    whole = [n for n, m in per_query.items() if m["why"] == "no box in the ground truth"]
    if whole:
        log.warning("masking=%d, but %d of %d queries have no box in the ground truth and "
                    "were searched with the whole image (first: %s)", masking, len(whole),
                    len(per_query), whole[0])
    return {"masking": masking, "masking_from": source, "per_query": per_query}


def summary_line(results: dict[str, Any], folder: Path, out: Path) -> str:
    """Step E's summary: the mAP (and Easy/Medium/Hard or the shot level) of one folder."""
    m = results["map"]
    line = (f"E: mAP {'n/a' if m is None else f'{m:.4f}'} over {results['n_queries']} "
            f"queries ({folder.name})")
    if results.get("protocol") == "revisited":
        parts = []
        for k in ("easy", "medium", "hard"):
            v = results[k]["map"]
            parts.append(f"{k[0].upper()} {'n/a' if v is None else f'{v:.4f}'}")
        line += " [" + " ".join(parts) + "]"
    elif results.get("level") == "shot":
        line += " [shot level]"
    return f"{line} -> {out}"


def evaluate_folder(settings: Any, folder: Path) -> tuple[dict[str, Any], Any, Any]:
    """(results, ground truth, rankings) of one ranking folder."""
    from lib.evaluation.metrics import evaluate
    from lib.groundtruth.loader import load_ground_truth
    from lib.search.rankings import read_ranking_folder

    gt = load_ground_truth(settings)
    if not folder.is_dir():
        raise UserError(f"{folder}: ranking folder not found (run step D, or pass --ranking)")
    rankings = read_ranking_folder(folder, gt.db_ids)
    results = evaluate(gt, rankings)
    by_name = {q.name: q for q in gt.queries}
    results["search_mode"] = search_modes(settings, rankings.meta,
                                          [by_name[n] for n in rankings.queries])
    results["ranking"] = folder.name
    results["settings"] = rankings.meta.get("settings")
    results["ground_truth"] = {"gt_format": settings["gt_format"],
                               "path_gt": str(settings["path_gt"])}
    return results, gt, rankings


def evaluate_run(settings: Settings, ranking: str | None = None) -> StepResult:
    """Step E on validated settings: evaluate the ranking folder ``ranking`` (see
    :func:`ranking_dir`; the command line's ``--ranking``), write map.txt, results.json
    and, with ``report``, the HTML report, under the output lock. ``counts`` holds the
    parsed results (what results.json says)."""
    s = settings
    t0 = time.perf_counter()
    folder = ranking_dir(Path(s.path_output), ranking)
    if not folder.is_dir():  # checked before the lock, which creates path_output
        raise UserError(f"{folder}: ranking folder not found (run step D, or pass "
                        "--ranking)")
    with output_lock(Path(s.path_output), "E"):
        results, gt, rankings = evaluate_folder(s, folder)
        write_text_atomic(folder / "map.txt", map_txt(results, rankings.queries))
        write_json_atomic(folder / "results.json", results)
        if s.report:
            try:
                from lib.evaluation.report import write_report
            except ModuleNotFoundError as e:
                if e.name != "lib.evaluation.report":
                    raise
                log.warning("lib.evaluation.report is not available; no HTML report written")
            else:
                page = write_report(folder, gt, s, results, rankings)
                log.info("report: %s", page)
    m = results["map"]
    if m is not None and not math.isfinite(m):
        log.warning("mAP is not finite")
    outputs = (folder / "map.txt", folder / "results.json")
    return StepResult("E", summary_line(results, folder, folder / "map.txt"), outputs,
                      results, time.perf_counter() - t0)
