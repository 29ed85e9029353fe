"""Shared command-line plumbing for the ``bow_pipeline`` scripts.

Each script builds its parser with :func:`make_parser`, loads settings with
:func:`load_from_args`, and runs its body inside :func:`run_main`, which turns the
errors a user can cause into one line on stderr and a non-zero exit code, and Ctrl-C
into exit code 130 with a note that the step can be resumed. :func:`run_step` does all
three for a step whose library entry point returns a :class:`lib.pipeline.StepResult`:
the script then only parses its arguments and names the function.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lib.errors import UserError, storage_error

if TYPE_CHECKING:
    from lib.pipeline import StepResult
    from lib.settings import Settings

log = logging.getLogger("blcf")

SNAPSHOT_OPTION = "--settings-snapshot"

# Loggers of libraries that report routine events at INFO, which the console would show
# as if they mattered: faiss's loader tries the AVX512 and AVX2 builds first and logs
# "Could not load library with AVX2 support due to: ModuleNotFoundError(...)" on every
# import, which reads like an error. Raised to ERROR unless -v.
CHATTY_LOGGERS = ("faiss.loader",)
# Warnings of the imaging and network libraries about things the steps handle (EXIF
# oddities, deprecated defaults of layers built the same way every time): hidden unless -v.
QUIET_WARNING_MODULES = ("torch", "torchvision", "PIL")

# the steps whose models are read, not trained: n_centers "auto" is resolved from the
# codebook for them (lib.vocabulary.sizing.resolve_from_codebook)
MODEL_READERS = ("C", "D")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser with the arguments every step shares."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("settings", type=Path, help="per-dataset settings JSON (see settings/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a settings key (JSON value or plain string); repeatable",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="what $DATA means in settings paths (default: $BLCF_DATA_ROOT or <repo>/data)",
    )
    p.add_argument(
        "--runs-root",
        type=Path,
        default=None,
        help="what $RUNS means in settings paths (default: $BLCF_RUNS_ROOT or <repo>/runs)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    # run_all starts every step on the one snapshot of the settings it validated
    # (lib.pipeline.write_snapshot), not on the user's file: not for users, hence hidden
    p.add_argument(SNAPSHOT_OPTION, dest="settings_snapshot", type=Path, default=None,
                   help=argparse.SUPPRESS)
    return p


def step_arguments(args: argparse.Namespace) -> list[str]:
    """The shared options of :func:`make_parser` that a step started as its own process by
    run_all still needs: ``-v`` when run_all got it, else ``--quiet``, so that the console
    shows run_all's line per step, each step's summary, warnings and progress bars, and
    not the steps' INFO logs. ``--set``, ``--data-root`` and ``--runs-root`` are not among
    them: they are already applied in the settings snapshot every step is started on
    (:func:`lib.pipeline.write_snapshot`), and must not be applied twice."""
    return ["-v"] if getattr(args, "verbose", False) else ["--quiet"]


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose``, WARNING with ``quiet``). Unless
    ``verbose``, third-party chatter is silenced (:data:`CHATTY_LOGGERS`,
    :data:`QUIET_WARNING_MODULES`); called before any step imports faiss, whose loader
    logs at import time."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:
        for module in QUIET_WARNING_MODULES:
            warnings.filterwarnings("ignore", category=UserWarning, module=module + r"(\..*)?$")


def load_from_args(args: argparse.Namespace, resolve_auto: bool = False):
    """Settings from the parsed arguments (raises SettingsError).

    A step started by run_all gets ``--settings-snapshot``: the settings run_all validated
    once, written with every override applied and every path absolute. The step loads
    (and validates) that snapshot instead of the user's file, which may have been edited
    since run_all started; error messages still name the user's file.

    ``resolve_auto``: for a program that reads the models, ``n_centers = "auto"`` becomes
    the size step B chose (recorded in the codebook's metadata); step B and run_all keep
    ``"auto"`` (B resolves it from its sample, and run_all's step hashes name the rule).
    :func:`run_step` resolves it for the steps in :data:`MODEL_READERS`."""
    from lib.errors import SettingsError
    from lib.settings import Settings, load_settings

    snapshot = getattr(args, "settings_snapshot", None)
    if snapshot is None:
        s = load_settings(
            args.settings, overrides=args.overrides, data_root=args.data_root,
            runs_root=args.runs_root,
        )
    elif args.overrides or args.data_root or args.runs_root:
        raise SettingsError(f"{SNAPSHOT_OPTION} already holds every override: give no "
                            "--set, --data-root or --runs-root with it")
    else:
        s = Settings(dict(load_settings(snapshot)), Path(args.settings).resolve())
    if resolve_auto and s["n_centers"] == "auto":
        from lib.vocabulary.sizing import resolve_from_codebook

        s = resolve_from_codebook(s)
    return s


def run_main(body: Callable[[], int | None], step: str) -> None:
    """Run ``body`` and exit: 0 on success, the error's code for a UserError,
    130 on Ctrl-C. Prints one clear line for the errors a user can fix. Freed memory
    stays in the process (lib/allocator.py: query loops would page-fault otherwise)."""
    from lib.allocator import retain_freed_memory

    retain_freed_memory()
    try:
        code = body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:  # a full disk, a read-only folder: the machine, not our code
        err = storage_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(f"\ninterrupted: step {step} stopped; work done so far is kept, "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def run_step(args: argparse.Namespace, step: str,
             call: Callable[[Settings], StepResult]) -> None:
    """A step script's body once its arguments are parsed: logging as asked, then inside
    :func:`run_main`: load the settings, call the step's library entry point, print its
    summary (one line; C streaming prints two). Exits."""
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from lib.pipeline import step_locks

        settings = load_from_args(args, resolve_auto=step in MODEL_READERS)
        # a shared path_features / path_models this step writes is locked too
        with step_locks(settings, [step], step):
            result = call(settings)
        if result.summary:
            print(result.summary)
        return 0

    run_main(body, step)
