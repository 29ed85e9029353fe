"""Settings: schema validation, defaults, path resolution, overrides, inheritance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.errors import SettingsError
from lib.settings import SCHEMA, load_settings, schema_markdown

REPO = Path(__file__).resolve().parent.parent


def write(p: Path, obj) -> Path:
    p.write_text(json.dumps(obj))
    return p


@pytest.fixture
def base(tmp_path: Path) -> dict:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt.json").write_text("{}")
    return {
        "dataset": "toy",
        "gt_format": "generic",
        "path_images": "imgs",
        "path_gt": "gt.json",
        "path_output": "out",
    }


def test_defaults_and_relative_paths(tmp_path, base):
    s = load_settings(write(tmp_path / "s.json", base))
    assert s.path_images == tmp_path / "imgs"
    assert s.path_output == tmp_path / "out"
    assert s.path_features == tmp_path / "out" / "features"
    assert s.path_models == tmp_path / "out" / "models"
    assert s.n_centers == 25000 and s.pca_dim == 512
    assert s.new_dim == [42, 32] and s.input_size == [336, 256]
    assert s.path_queries is None and s.path_images == tmp_path / "imgs"


def test_data_root_variable(tmp_path, base):
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    base["path_images"] = "$DATA/x"
    s = load_settings(write(tmp_path / "s.json", base), data_root=root)
    assert s.path_images == (root / "x").resolve()


def test_env_data_root(tmp_path, base, monkeypatch):
    root = tmp_path / "envroot"
    (root / "x").mkdir(parents=True)
    monkeypatch.setenv("BLCF_DATA_ROOT", str(root))
    base["path_images"] = "$DATA/x"
    assert load_settings(write(tmp_path / "s.json", base)).path_images == (root / "x").resolve()


def test_unknown_key_names_key_and_file(tmp_path, base):
    base["n_center"] = 10
    f = write(tmp_path / "s.json", base)
    with pytest.raises(SettingsError, match=r"s\.json: unknown settings key 'n_center'"):
        load_settings(f)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("n_centers", "many", "expected an integer"),
        ("n_centers", True, "expected an integer"),
        ("l2norm", 1, "expected true/false"),
        ("input_size", [336], "expected 2 values"),
        ("masking", 7, "7 is not one of"),
        ("network", "alexnet", "'alexnet' is not one of"),
        ("ar_threshold", "x", "expected a number"),
    ],
)
def test_wrong_types(tmp_path, base, key, value, pattern):
    base[key] = value
    with pytest.raises(SettingsError, match=f"key '{key}': {pattern}"):
        load_settings(write(tmp_path / "s.json", base))


def test_missing_required_key(tmp_path, base):
    del base["path_gt"]
    with pytest.raises(SettingsError, match="missing required key 'path_gt'"):
        load_settings(write(tmp_path / "s.json", base))


def test_missing_path(tmp_path, base):
    base["path_images"] = "nowhere"
    with pytest.raises(SettingsError, match="key 'path_images': path does not exist"):
        load_settings(write(tmp_path / "s.json", base))


def test_overrides(tmp_path, base):
    f = write(tmp_path / "s.json", base)
    s = load_settings(f, overrides=["n_centers=64", "network=efficientnet_lite0",
                                    "new_dim=null", "rerank=true"])
    assert s.n_centers == 64 and s.network == "efficientnet_lite0"
    assert s.new_dim is None and s.rerank is True
    with pytest.raises(SettingsError, match="^--set bogus=1: unknown settings key 'bogus'$"):
        load_settings(f, overrides=["bogus=1"])
    with pytest.raises(SettingsError, match="key 'n_centers': expected an integer"):
        load_settings(f, overrides=["n_centers=abc"])


def test_override_errors_name_the_set_not_a_file(tmp_path, base):
    """A bad --set value is reported as the --set that gave it (there is no file)."""
    f = write(tmp_path / "s.json", base)
    with pytest.raises(SettingsError) as e:
        load_settings(f, overrides=["masking=yes"])
    assert str(e.value) == "--set masking=yes: key 'masking': expected an integer, got 'yes'"
    with pytest.raises(SettingsError) as e:
        load_settings(f, overrides=["path_queries=nowhere"])
    assert str(e.value).startswith("--set path_queries=nowhere: key 'path_queries': path "
                                   "does not exist")
    with pytest.raises(SettingsError) as e:  # programmatic overrides too
        load_settings(f, overrides={"masking": "yes"})
    assert str(e.value).startswith('--set masking="yes": key \'masking\'')
    base["masking"] = "yes"  # from the file: the file is named
    with pytest.raises(SettingsError, match=r"s2\.json: key 'masking': expected an integer"):
        load_settings(write(tmp_path / "s2.json", base))


def test_unknown_keys_suggest_the_closest(tmp_path, base):
    f = write(tmp_path / "s.json", base)
    with pytest.raises(SettingsError) as e:
        load_settings(f, overrides=["n_center=64"])
    assert str(e.value) == ("--set n_center=64: unknown settings key 'n_center'; did you "
                            "mean 'n_centers'?")
    base["kmeans_iters"] = 5
    with pytest.raises(SettingsError) as e:
        load_settings(write(tmp_path / "s2.json", base))
    assert str(e.value).endswith("s2.json: unknown settings key 'kmeans_iters'; did you mean "
                                 "'kmeans_iter'?")
    del base["kmeans_iters"]
    base["zzzz_qqq"] = 1  # nothing close: no suggestion
    with pytest.raises(SettingsError) as e:
        load_settings(write(tmp_path / "s3.json", base))
    assert str(e.value).endswith("unknown settings key 'zzzz_qqq'")
    s = load_settings(f)
    with pytest.raises(SettingsError, match="did you mean 'pca_dim'"):
        s.replace(pca_dims=3)


def test_n_centers_auto_and_kmeans_tol(tmp_path, base):
    """n_centers takes "auto" (and nothing else that is not an integer); kmeans_tol is a
    step B key: changing it reruns B, not A."""
    f = write(tmp_path / "s.json", base)
    s = load_settings(f, overrides=["n_centers=auto"])
    assert s.n_centers == "auto"
    with pytest.raises(SettingsError, match='key \'n_centers\': expected an integer or "auto"'):
        load_settings(f, overrides=["n_centers=many"])
    assert load_settings(f).kmeans_tol == 1e-4
    with pytest.raises(SettingsError, match="key 'kmeans_tol': must be between 0 and 1"):
        load_settings(f, overrides=["kmeans_tol=-1"])
    a, b = load_settings(f), load_settings(f, overrides=["kmeans_tol=0"])
    assert a.step_hash("A") == b.step_hash("A")
    assert a.step_hash("B") != b.step_hash("B")
    assert s.step_hash("B") != a.step_hash("B")  # "auto" is not the default 25000


def test_extends(tmp_path, base):
    write(tmp_path / "parent.json", base)
    child = write(tmp_path / "child.json", {"extends": "parent.json", "n_centers": 100})
    s = load_settings(child)
    assert s.n_centers == 100 and s.dataset == "toy"
    assert s.path_images == tmp_path / "imgs"


def test_cross_checks(tmp_path, base):
    base["query_expansion"] = "lqe"
    with pytest.raises(SettingsError, match="'lqe' needs rerank"):
        load_settings(write(tmp_path / "s.json", base))


def test_step_hash_tracks_relevant_keys(tmp_path, base):
    f = write(tmp_path / "s.json", base)
    a = load_settings(f)
    b = load_settings(f, overrides=["masking=0"])
    c = load_settings(f, overrides=["n_centers=10"])
    assert a.step_hash("C") == b.step_hash("C")  # masking is a D key
    assert a.step_hash("D") != b.step_hash("D")
    assert a.step_hash("A") == c.step_hash("A") and a.step_hash("B") != c.step_hash("B")


def test_every_shipped_settings_file_validates():
    files = sorted((REPO / "settings").glob("*.json"))
    assert files, "settings/ must hold the per-dataset files"
    for f in files:
        load_settings(f, check_paths=False)


def test_schema_documented_in_settings_reference():
    ref = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    for k in SCHEMA:
        assert f"`{k.name}`" in ref, f"settings key {k.name} is not documented in docs/settings.md"
    assert schema_markdown() in ref


def test_settings_reference_is_generated():
    # docs/settings.md must be exactly what its generator writes from the schema, so it
    # cannot go stale: after a schema change, run docs/make_settings_reference.py
    p = subprocess.run([sys.executable, str(REPO / "docs" / "make_settings_reference.py"),
                        "--check"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
