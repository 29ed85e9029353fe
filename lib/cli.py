"""Shared command-line plumbing for the ``bow_pipeline`` scripts.

Each script builds its parser with :func:`make_parser`, loads settings with
:func:`load_from_args`, and runs its body inside :func:`run_main`, which turns the
errors a user can cause into one line on stderr and a non-zero exit code, and Ctrl-C
into exit code 130 with a note that the step can be resumed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from lib.errors import UserError

log = logging.getLogger("blcf")


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
    return p


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def load_from_args(args: argparse.Namespace):
    """Settings from the parsed arguments (raises SettingsError)."""
    from lib.settings import load_settings

    return load_settings(
        args.settings, overrides=args.overrides, data_root=args.data_root,
        runs_root=args.runs_root,
    )


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
    except KeyboardInterrupt:
        print(f"\ninterrupted: step {step} stopped; work done so far is kept, "
              "rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
