"""Uneven strided shares, the one-process gather, and what post-training and TTT refuse (or do) on several ranks.

Fast: no torchrun here. The refusals are checked in one process with torchrun's ``WORLD_SIZE`` / ``RANK`` set, since
they happen before any process group is joined; the multi-rank runs are in ``test_stages_torchrun.py``.
"""

from __future__ import annotations

import logging

import pytest

from refine_core.config import ConfigError, load_config
from refine_core.distributed.split_work import broadcast_from_main, gather_to_main, largest_share, strided_share
from refine_core.stages.post_train import check_data_parallel, post_train
from refine_core.stages.ttt import order_dependent
from refine_core.stages.ttt import test_time_train as run_ttt


def _round_robin(n: int, world: int) -> list[list[int]]:
    """The reference: deal items 0..n-1 to the ranks one at a time, like cards."""
    hands: list[list[int]] = [[] for _ in range(world)]
    for item in range(n):
        hands[item % world].append(item)
    return hands


@pytest.mark.parametrize(("n", "world"), [(6, 4), (2, 3), (4, 3), (8, 2), (0, 2), (5, 1)])
def test_strided_share_deals_every_item_once(n, world):
    items = list(range(n))
    shares = [strided_share(items, rank, world) for rank in range(world)]
    assert shares == _round_robin(n, world)
    assert max(len(s) for s in shares) == largest_share(n, world)
    with pytest.raises(ValueError, match="rank 3 is not in"):
        strided_share(items, 3, 3)


def test_gather_and_broadcast_are_the_identity_in_one_process():
    assert gather_to_main({"a": 1}) == [{"a": 1}]
    assert broadcast_from_main([1, 2]) == [1, 2]


def _post_cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", "device=cpu", "post.train_files=[nowhere.parquet]",
                              "tracking.backend=none", *extra])


def test_post_train_nested_modes_refuse_uneven_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    nested = ("post.mode=nested_refine", "post.batch_size=6", "refine.batch_size=6", "refine.mini_batch_size=3",
              "refine.micro_batch_size=1")
    check_data_parallel(_post_cfg(tmp_path, *nested), 3)  # even: accepted, under DDP and FSDP
    check_data_parallel(_post_cfg(tmp_path, *nested, "parallel=fsdp"), 3)
    # Refused before the task files are even looked for (they do not exist here).
    with pytest.raises(ConfigError, match=r"post.batch_size=4 .* multiples of 3.*post.mode=sft"):
        post_train(_post_cfg(tmp_path, "post.mode=nested_sft", "post.batch_size=4", "refine.mini_batch_size=2"))
    with pytest.raises(ConfigError, match=r"min\(refine.mini_batch_size, post.batch_size\) = 2"):
        check_data_parallel(_post_cfg(tmp_path, "post.mode=nested_refine", "post.batch_size=6",
                                      "refine.mini_batch_size=2"), 3)
    # Task SFT takes any split, under DDP or FSDP.
    check_data_parallel(_post_cfg(tmp_path, "post.mode=sft", "post.batch_size=4", "parallel=fsdp"), 3)
    check_data_parallel(_post_cfg(tmp_path, "post.mode=sft", "post.batch_size=2"), 3)


def _ttt_cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", "device=cpu", "model.source=/nonexistent/model",
                              "eval.task_files=[nowhere.parquet]", "tracking.backend=none", *extra])


def test_ttt_refuses_fsdp_and_runs_cumulative_mode_on_rank_zero_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="ttt does not support parallel=fsdp.*ttt.mode=reset"):
        run_ttt(_ttt_cfg(tmp_path, "parallel=fsdp", "ttt.mode=reset"))
    # Rank 1 of a cumulative run says why and returns at once: nothing is loaded (the model does not exist).
    with caplog.at_level(logging.WARNING, logger="refine_core.stages.ttt"):
        result = run_ttt(_ttt_cfg(tmp_path, "ttt.mode=cumulative"))
    assert result.summary == {} and result.output_dir == tmp_path / "ttt"
    assert "cannot be split over the 2 ranks" in caplog.text and "Use ttt.mode=reset" in caplog.text
    assert not (tmp_path / "ttt").exists()


def test_only_cumulative_adaptation_depends_on_the_batch_order(tmp_path):
    def ttt(mode: str, method: str) -> bool:
        return order_dependent(_ttt_cfg(tmp_path, f"ttt.mode={mode}", f"ttt.method={method}").ttt)

    assert ttt("cumulative", "refine") and ttt("cumulative", "ntp")
    assert not ttt("cumulative", "none") and not ttt("reset", "refine") and not ttt("reset", "ntp")
