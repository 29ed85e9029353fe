#!/usr/bin/env python
"""Start a Dask cluster on SLURM with dask-jobqueue and run steps A and C of one
settings file on it (docs/cluster.md). An example to adapt: queue names, memory and
the GPU request are site-specific.

    pip install -e .[cluster] dask-jobqueue
    OMP_NUM_THREADS=4 python docs/examples/slurm_cluster.py settings/roxford5k_r1m.json \\
        --jobs 8 --cores 4 --gpus 1

Every worker job runs one Dask worker process with one task thread (a task sets the
network's threads itself) and, with ``--gpus 1``, one GPU: SLURM sets
CUDA_VISIBLE_DEVICES for the job, so the worker sees exactly its GPU. The repository
and its ``.venv``, the images, the models and the run folder must be on a filesystem
every node mounts at the same path. Run this script on a login node or in a small
job of its own: it is the driver, the only process that writes the stores.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings")
    ap.add_argument("--jobs", type=int, default=4, help="worker jobs (one worker each)")
    ap.add_argument("--cores", type=int, default=4, help="cores per worker job")
    ap.add_argument("--memory", default="16GB", help="memory per worker job")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per worker job (0 or 1)")
    ap.add_argument("--queue", default=None, help="SLURM partition")
    ap.add_argument("--walltime", default="04:00:00")
    ap.add_argument("--shard-size", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dask_jobqueue import SLURMCluster

    extra = [f"--gres=gpu:{args.gpus}"] if args.gpus else []
    cluster = SLURMCluster(
        cores=1, processes=1,  # one worker process, one task at a time
        job_cpu=args.cores, memory=args.memory, queue=args.queue,
        walltime=args.walltime, job_extra_directives=extra,
        python=str(REPO / ".venv" / "bin" / "python"),
        job_script_prologue=[
            f"cd {REPO}",
            # the driver's thread count: the maps' last bits depend on it (docs/cluster.md)
            f"export OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', args.cores)}",
            # decode workers (DataLoader processes) need a non-daemonic worker
            "export DASK_DISTRIBUTED__WORKER__DAEMON=False",
            "export TQDM_DISABLE=1",
        ])
    cluster.scale(jobs=args.jobs)
    logging.info("scheduler at %s; workers start as SLURM grants the jobs",
                 cluster.scheduler_address)
    try:
        for script in ("A_feature_extraction.py", "C_bow_representation.py"):
            cmd = [sys.executable, str(REPO / "bow_pipeline" / script), args.settings,
                   "--set", f"cluster={cluster.scheduler_address}",
                   "--set", f"shard_size={args.shard_size}"]
            logging.info("running %s", " ".join(cmd))
            subprocess.run(cmd, check=True, cwd=REPO)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
