"""The compiled ASMK scoring loop (lib/index/native.py, asmk_native.c): the same scores as
numpy bit for bit, its refusals, and the fallback when it cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lib.index import asmk, native
from lib.index.asmk import kernel_table, score_postings


def _index(rng: np.random.Generator, n_bytes: int, n_words: int = 40, n_docs: int = 200
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lens = rng.integers(0, 60, n_words)
    lens[3] = 0  # a word without postings
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    docs = np.concatenate([np.sort(rng.choice(n_docs, n, replace=False)) for n in lens])
    sigs = rng.integers(0, 256, (docs.size, n_bytes), dtype=np.uint8)
    return offsets, docs.astype(np.uint32), sigs


needs_library = pytest.mark.skipif(native.asmk_library() is None,
                                   reason="no C compiler: the compiled loop is unavailable")


@needs_library
@pytest.mark.parametrize("n_bytes", [4, 8, 12, 16, 64])
def test_compiled_loop_equals_numpy_bit_for_bit(n_bytes: int) -> None:
    rng = np.random.default_rng(n_bytes)
    offsets, docs, sigs = _index(rng, n_bytes)
    n_docs = 200
    for per_doc in (False, True):
        for weighted in (False, True):
            for sigma, alpha, tau in (("asmk", 3.0, 0.0), ("shifted", 0.25, -1.0)):
                w = rng.random(n_docs if per_doc else docs.size).astype(np.float32)
                qw = np.sort(rng.choice(40, 25, replace=False))
                qs = rng.integers(0, 256, (qw.size, n_bytes), dtype=np.uint8)
                qs[0] = sigs[offsets[qw[0]]] if offsets[qw[0] + 1] > offsets[qw[0]] else qs[0]
                qwt = rng.random(qw.size) if weighted else None
                kw = {"alpha": alpha, "tau": tau, "per_doc": per_doc, "query_weights": qwt,
                      "sigma": sigma}
                fast = score_postings(qw, qs, offsets, docs, sigs, w, n_docs, **kw)
                slow = score_postings(qw, qs, offsets, docs, sigs, w, n_docs, native=False,
                                      **kw)
                assert fast.dtype == np.float32 and np.count_nonzero(fast) > 10
                np.testing.assert_array_equal(fast, slow)


@needs_library
def test_float64_sums_are_identical() -> None:
    """The per-doc float64 sums themselves, before the float32 scores, to the bit."""
    lib = native.asmk_library()
    rng = np.random.default_rng(11)
    for n_bytes in (4, 16, 64):
        offsets, docs, sigs = _index(rng, n_bytes)
        qw = np.sort(rng.choice(40, 30, replace=False))
        qs = rng.integers(0, 256, (qw.size, n_bytes), dtype=np.uint8)
        lo, hi = offsets[qw], offsets[qw + 1]
        table = kernel_table(8 * n_bytes, 0.5, -1.0, "shifted").astype(np.float64)
        for per_doc in (False, True):
            w = rng.random(200 if per_doc else docs.size).astype(np.float32)
            for qwt in (None, rng.random(qw.size)):
                args = (lo, hi, qs, sigs, docs, w, per_doc, table, qwt, 200)
                fast = asmk._accumulate_native(lib, *args)
                slow = asmk._accumulate_numpy(*args)
                assert np.count_nonzero(fast) > 10
                np.testing.assert_array_equal(fast.view(np.int64), slow.view(np.int64))


class _Counting:
    """A library stand-in that counts the calls it passes on to the real one."""

    def __init__(self, lib: object) -> None:
        self.lib, self.calls = lib, 0

    def asmk_accumulate(self, *args: object) -> int:
        self.calls += 1
        return self.lib.asmk_accumulate(*args)  # type: ignore[attr-defined]


@needs_library
@pytest.mark.parametrize("defines", [["PREFETCH_BYTES=0"], ["PREFETCH_BYTES=64"]])
def test_a_variant_build_scores_the_same_bits(tmp_path: Path, defines: list[str]) -> None:
    """A build without the prefetch hint (or with another distance), passed as
    ``native=``, is the one that scores, and gives the sums of the loop in use: the hint
    changes speed only. The hint also reaches past the arrays' last posting here."""
    variant = _Counting(native.build_variant(tmp_path / "variant.so", defines))
    rng = np.random.default_rng(5)
    for n_bytes in (8, 16, 64):
        offsets, docs, sigs = _index(rng, n_bytes)
        qw = np.arange(40)  # every word: the last run ends at the arrays' end
        qs = rng.integers(0, 256, (qw.size, n_bytes), dtype=np.uint8)
        w = rng.random(docs.size).astype(np.float32)
        ref = score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False)
        got = score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False,
                             native=variant)
        assert np.count_nonzero(ref) > 10
        np.testing.assert_array_equal(got, ref)
    assert variant.calls == 3


def test_build_variant_refuses_a_reused_path_and_a_bare_string(tmp_path: Path) -> None:
    (tmp_path / "old.so").write_bytes(b"")
    with pytest.raises(FileExistsError, match="new path"):
        native.build_variant(tmp_path / "old.so", ["PREFETCH_BYTES=0"])
    with pytest.raises(TypeError, match="list"):
        native.build_variant(tmp_path / "new.so", "PREFETCH_BYTES=0")


def test_native_must_be_a_bool_or_a_library() -> None:
    rng = np.random.default_rng(2)
    offsets, docs, sigs = _index(rng, 16)
    qw = np.arange(5)
    qs = rng.integers(0, 256, (5, 16), dtype=np.uint8)
    w = rng.random(docs.size).astype(np.float32)
    ref = score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False, native=False)
    got = score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False,
                         native=np.bool_(False))
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(TypeError, match="native"):
        score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False, native=None)


@needs_library
def test_memory_mapped_index_is_read_in_place(tmp_path: Path) -> None:
    """The index's arrays are memory-mapped: the loop reads them without a copy and
    gives numpy's scores."""
    rng = np.random.default_rng(7)
    offsets, docs, sigs = _index(rng, 16)
    w = rng.random(docs.size).astype(np.float32)
    for name, arr in (("docs", docs), ("sigs", sigs), ("w", w)):
        np.save(tmp_path / f"{name}.npy", arr)
    mm = {n: np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("docs", "sigs", "w")}
    qw = np.arange(0, 40, 2)
    qs = rng.integers(0, 256, (qw.size, 16), dtype=np.uint8)
    for name, dtype in (("docs", np.uint32), ("sigs", np.uint8), ("w", np.float32)):
        assert np.shares_memory(asmk._c_array(mm[name], dtype), mm[name])  # no copy
    fast = score_postings(qw, qs, offsets, mm["docs"], mm["sigs"], mm["w"], 200, per_doc=False)
    slow = score_postings(qw, qs, offsets, docs, sigs, w, 200, per_doc=False, native=False)
    np.testing.assert_array_equal(fast, slow)


def _skip_without(use_native: bool) -> None:
    if use_native and native.asmk_library() is None:
        pytest.skip("no C compiler")


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("per_doc", [False, True])
def test_a_doc_id_beyond_the_database_is_refused(use_native: bool, per_doc: bool) -> None:
    """With per-posting and with per-doc weights (where numpy would index the weights
    with the bad id), both paths refuse it alike."""
    _skip_without(use_native)
    rng = np.random.default_rng(1)
    offsets, docs, sigs = _index(rng, 16)
    docs = docs.copy()
    docs[offsets[5]] = 200  # one past the last doc: a damaged index
    w = np.ones(200 if per_doc else docs.size, np.float32)
    with pytest.raises(ValueError, match="doc id"):
        score_postings(np.array([5]), np.zeros((1, 16), np.uint8), offsets, docs, sigs, w,
                       200, per_doc=per_doc, native=use_native)


@pytest.mark.parametrize("use_native", [True, False])
@pytest.mark.parametrize("damage", ["beyond", "out_of_order", "negative"])
def test_damaged_offsets_are_refused(use_native: bool, damage: str) -> None:
    """The compiled loop reads the query words' runs unchecked, so damaged offsets must be
    refused before it (it would read outside the arrays), and numpy refuses alike."""
    _skip_without(use_native)
    rng = np.random.default_rng(2)
    offsets, docs, sigs = _index(rng, 16)
    offsets = offsets.copy()
    if damage == "beyond":
        offsets[6:] += docs.size  # words 5.. run past the last posting
    elif damage == "out_of_order":
        offsets[6] = offsets[5] - 1
    else:
        offsets[5] = -8
    with pytest.raises(ValueError, match="offsets"):
        score_postings(np.array([5]), np.zeros((1, 16), np.uint8), offsets, docs, sigs,
                       np.ones(docs.size, np.float32), 200, per_doc=False, native=use_native)


def test_weights_and_doc_ids_are_taken_as_stored() -> None:
    """Both paths score float32 weights and uint32 doc ids (the index's dtypes): float64
    weights and int64 ids give the scores of their float32 / uint32 copies."""
    rng = np.random.default_rng(5)
    offsets, docs, sigs = _index(rng, 16)
    w64 = rng.random(docs.size)
    qw = np.arange(0, 40, 3)
    qs = rng.integers(0, 256, (qw.size, 16), dtype=np.uint8)
    for use_native in (True, False):
        a = score_postings(qw, qs, offsets, docs.astype(np.int64), sigs, w64, 200,
                           per_doc=False, native=use_native)
        b = score_postings(qw, qs, offsets, docs, sigs, w64.astype(np.float32), 200,
                           per_doc=False, native=use_native)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        score_postings(qw, qs, offsets, docs.astype(np.int64) + 2**32, sigs, w64, 200,
                       per_doc=False)


def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BLCF_CACHE", str(tmp_path / "cache"))


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("BLCF_NATIVE", "0")
    assert native.asmk_library() is None
    assert not (tmp_path / "cache").exists()  # nothing built


def test_a_failing_compiler_falls_back_to_numpy(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "false")  # exists everywhere, always fails
    with caplog.at_level(logging.INFO, logger="lib.index.native"):
        assert native.asmk_library() is None
    assert "numpy" in caplog.text and "failed" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left

    def no_native(*_: object) -> None:
        raise AssertionError("the compiled loop was called")

    monkeypatch.setattr(asmk, "_accumulate_native", no_native)
    rng = np.random.default_rng(3)
    offsets, docs, sigs = _index(rng, 16)
    s = score_postings(np.array([0, 1, 2]), sigs[[0, offsets[1], offsets[2]]], offsets, docs,
                       sigs, np.ones(docs.size, np.float32), 200, per_doc=False)
    assert s.max() > 0  # scored, by numpy


def test_missing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "no-such-compiler-blcf")
    with caplog.at_level(logging.INFO, logger="lib.index.native"):
        assert native.asmk_library() is None
    assert "no-such-compiler-blcf" in caplog.text  # the message names what CC says


@pytest.mark.skipif(native.shutil.which("gcc") is None, reason="no gcc")
def test_cc_with_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CC may be a command with arguments (``ccache gcc``, ``gcc -Wall``)."""
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "gcc -Wall")
    assert native.asmk_library() is not None
    assert native.library_path().exists()


@needs_library
def test_a_damaged_library_is_built_again(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    _fresh(monkeypatch, tmp_path)
    target = native.library_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")
    assert native.asmk_library() is not None
    assert target.read_bytes()[:4] != b"not "


@pytest.mark.parametrize("value", ["0", "false", "off", "No"])
def test_disabled_by_any_false_value(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     value: str) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("BLCF_NATIVE", value)
    assert native.asmk_library() is None


@needs_library
def test_built_once_into_a_name_that_hashes_the_source(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    _fresh(monkeypatch, tmp_path)
    lib = native.asmk_library()
    assert lib is not None and native.asmk_library() is lib  # loaded once per process
    built = list((tmp_path / "cache").iterdir())
    assert built == [native.library_path()]
    assert built[0].stat().st_mode & 0o044  # readable by others sharing the cache
    # another source gets another name, so a changed loop is never served stale
    changed = tmp_path / "asmk_native.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.library_path() != built[0]
