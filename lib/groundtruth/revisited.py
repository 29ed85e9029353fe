"""Revisited Oxford/Paris ground truth (``gnd_roxford5k.pkl``, ``gnd_rparis6k.pkl``).

The official files are Python pickles. Unpickling runs code named in the file, so they
are read with :class:`RestrictedUnpickler`, which admits only what plain containers and
numpy arrays need; any other global (``os.system``, ``builtins.eval``, a class) is
refused with a UserError naming it. The content then goes through the same layout
reader as the generic JSON (``imlist``, ``qimlist``, ``gnd[i]`` with ``bbx``, ``easy``,
``hard``, ``junk``; Easy/Medium/Hard per field_notes §4).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from lib.errors import UserError
from lib.groundtruth.common import GroundTruth, read_gt_bytes
from lib.groundtruth.loader import read_revisited_layout, register

# (module, name) pairs a pickle of containers and numpy arrays may reference.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("builtins", "bytes"),
    ("__builtin__", "bytes"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_restricted_pickle(path: Path) -> Any:
    """Content of a ground-truth pickle, refusing anything but data (UserError)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: ground-truth pickle not found")
    data = read_gt_bytes(path, "ground-truth pickle")
    try:
        # a length field may claim far more bytes than the file holds (BINBYTES8 of a
        # terabyte): walking the opcodes first checks every one against the data, so
        # the unpickler never allocates for a claim the file cannot back
        for _ in pickletools.genops(data):
            pass
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except MemoryError:
        raise UserError(f"{path}: not a readable ground-truth pickle (it asks for more "
                        "memory than this machine has)") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load ({e}); only plain containers and numpy "
                        "arrays are accepted") from None
    except RecursionError:
        raise UserError(f"{path}: not a readable ground-truth pickle (nested too "
                        "deeply)") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: not a readable ground-truth pickle ({e})") from None


def _find_pickle(path_gt: Path, name: str) -> Path:
    if not path_gt.is_dir():
        return path_gt
    own = path_gt / f"gnd_{name}.pkl"
    if own.is_file():
        return own
    found = sorted(path_gt.glob("gnd_*.pkl"))
    if len(found) != 1:
        raise UserError(f"{path_gt}: expected gnd_{name}.pkl (or a single gnd_*.pkl) in the "
                        "folder; set path_gt to the file")
    return found[0]


@register("revisited")
def read_revisited(path_gt: Path, path_images: Path, name: str) -> GroundTruth:
    """Revisited ground truth; ``path_images`` is not listed (the database is ``imlist``)."""
    f = _find_pickle(Path(path_gt), name)
    data = load_restricted_pickle(f)
    if not isinstance(data, dict):
        raise UserError(f"{f}: expected a dict with imlist, qimlist and gnd, got "
                        f"{type(data).__name__}")
    if isinstance(data.get("imlist"), (bytes, str)) or isinstance(data.get("qimlist"),
                                                                   (bytes, str)):
        raise UserError(f"{f}: imlist and qimlist must be lists of image names")
    return read_revisited_layout(data, name, f, protocol="revisited")


__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "load_restricted_pickle",
           "read_revisited"]
