"""fla kernel configs exported from Triton's autotune records: fla's file format, key hashing and fastest choice."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from refine_core import runtime
from refine_core.models.ops.fla_configs import best_config, export_fla_configs


def _config(bv: int, warps: int) -> dict:
    return {"kwargs": {"BK": 64, "BV": bv}, "num_warps": warps, "num_ctas": 1, "num_stages": 3, "maxnreg": None,
            "pre_hook": None, "ir_override": None}


def _record(tmp_path, folder: str, kernel: str, key: list, timings: list) -> None:
    path = tmp_path / "triton" / folder / f"{kernel}.autotune.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "configs_timings": timings}))


def test_export_writes_fla_entries_keyed_as_fla_hashes_them(tmp_path):
    key = [8, 8, 128, 128, 64, False, "torch.bfloat16", "torch.int64"]
    fast, slow = _config(64, 4), _config(128, 8)
    _record(tmp_path, "A", "chunk_fwd_kernel_o", key, [[slow, [0.09, 0.08, 0.1]], [fast, [0.06, 0.05, 0.07]]])
    _record(tmp_path, "B", "chunk_fwd_kernel_o", [16, *key[1:]], [[slow, [0.05, 0.05, 0.05]]])
    _record(tmp_path, "C", "l2norm_fwd_kernel", [128, 1, "torch.bfloat16"], [])  # no timings: nothing to export
    counts = export_fla_configs(tmp_path / "triton", tmp_path / "fla")
    assert counts == {"chunk_fwd_kernel_o": 2}
    data = json.loads((tmp_path / "fla" / "chunk_fwd_kernel_o.json").read_text())
    # fla's AutotuneKey.key_hash: md5 of the compact, key-sorted JSON of the key list
    digest = hashlib.md5(json.dumps(key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()
    assert data["autotune_entries"][digest] == {"autotune_key": key, "config": fast}
    # a second export merges
    _record(tmp_path, "D", "chunk_fwd_kernel_o", [32, *key[1:]], [[fast, [0.1, 0.1, 0.1]]])
    export_fla_configs(tmp_path / "triton", tmp_path / "fla")
    assert len(json.loads((tmp_path / "fla" / "chunk_fwd_kernel_o.json").read_text())["autotune_entries"]) == 3


def test_best_config_is_the_fastest_median():
    a, b = _config(32, 2), _config(64, 4)
    assert best_config([[a, [0.2, 0.1, 0.3]], [b, [0.15, 0.14, 0.4]]]) == b


def test_triton_cache_with_fla_configs_points_fla_at_them(tmp_path, monkeypatch):
    for name in ("FLA_CONFIG_DIR", "FLA_CACHE_MODE", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    runtime.configure_triton_cache(tmp_path / "cache")
    assert "FLA_CONFIG_DIR" not in os.environ  # nothing exported yet
    (tmp_path / "cache" / runtime.FLA_CONFIGS_SUBDIR).mkdir()
    (tmp_path / "cache" / runtime.FLA_CONFIGS_SUBDIR / "k.json").write_text("{}")
    runtime.configure_triton_cache(tmp_path / "cache")
    assert os.environ["FLA_CONFIG_DIR"] == str((tmp_path / "cache" / "fla_configs").resolve())
    assert os.environ["FLA_CACHE_MODE"] == "strict"  # a config only fits the key it was tuned for


def test_use_fla_configs_refuses_after_fla_is_imported(monkeypatch):
    import sys
    import types

    from refine_core.models.ops.fla_configs import use_fla_configs

    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    with pytest.raises(RuntimeError, match="before anything imports fla"):
        use_fla_configs("/nowhere")
