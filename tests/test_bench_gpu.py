"""bench/bench_gpu.py's bookkeeping on CPU: figures of one card are never mixed with another card's."""

from __future__ import annotations

import argparse
import json

from bench.bench_gpu import _done, summarize


def _write(state, records) -> None:
    (state / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_and_done_parts_keep_cards_apart(tmp_path):
    h200, h100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    step = {"part": "steps-340m-4k", "case": "branch"}
    others = [
        {"part": "steps-340m-4k", "case": case, "card": card} for case in ("ntp", "faithful") for card in (h200, h100)
    ]
    _write(tmp_path, [
        {"part": "env", "card": h200, "date": "2026-12-05", "torch": "2.11"},
        {**step, "ratio_to_ntp": 3.37, "card": h200},
        {**step, "ratio_to_ntp": 2.75, "card": h100},
        *others,
    ])
    newest = summarize(argparse.Namespace(state=str(tmp_path), latest=None, card=None))
    assert newest["card"] == h100 and newest["refine_branch_over_ntp_340m_4k"] == 2.75
    assert newest["date"] is None  # the H200's env record does not describe the H100
    latest = tmp_path / "latest.json"
    older = summarize(argparse.Namespace(state=str(tmp_path), latest=str(latest), card=h200))
    assert older["refine_branch_over_ntp_340m_4k"] == 3.37 and older["torch"] == "2.11"
    assert json.loads(latest.read_text()) == older
    assert _done(tmp_path, h100) == {"steps-340m-4k"}
    assert _done(tmp_path, h200) == {"env", "steps-340m-4k"}


def test_a_steps_part_cut_short_is_measured_again_and_the_newest_record_wins(tmp_path):
    """A slot that ran out of time after the NTP case leaves the part undone; a later slot's figures replace it."""
    card = "NVIDIA H100 80GB HBM3"
    old = {"part": "steps-1p3b-16k", "card": card}  # written before records carried their PARTS key
    _write(tmp_path, [{**old, "case": "ntp", "tokens_per_s": 100, "achieved_tflops": 1.0}])
    assert _done(tmp_path, card) == set()
    new = {**old, "part_key": "steps-1p3b-16k", "commit": "abc1234"}
    faithful = {**old, "part_key": "faithful-1p3b-16k", "commit": "abc1234"}
    _write(tmp_path, [
        {**old, "case": "ntp", "tokens_per_s": 100},
        {**new, "case": "ntp", "tokens_per_s": 200},
        {**new, "case": "branch", "ratio_to_ntp": 2.0, "peak_mem_gib": 30.0},
        {**faithful, "case": "ntp", "tokens_per_s": 210},
    ])
    assert _done(tmp_path, card) == {"steps-1p3b-16k"}  # the faithful part still lacks its faithful case
    latest = summarize(argparse.Namespace(state=str(tmp_path), latest=None, card=card))
    assert latest["ntp_tok_s_1p3b_16k"] == 210 and latest["refine_branch_over_ntp_1p3b_16k"] == 2.0
    assert latest["refine_peak_mem_gib_1p3b_16k"] == 30.0 and latest["commits"] == ["abc1234"]


def test_the_tests_part_is_done_only_when_every_test_file_passed(tmp_path):
    """A GPU test file that failed runs again in the next slot (the committed records seed a fresh state)."""
    from bench.bench_gpu import GPU_TEST_FILES

    card = "NVIDIA H100 80GB HBM3"
    records = [{"part": "tests", "part_key": "tests", "case": name, "card": card, "returncode": 0}
               for name in GPU_TEST_FILES]
    records[1] = {**records[1], "returncode": 1}
    _write(tmp_path, records)
    assert "tests" not in _done(tmp_path, card)
    _write(tmp_path, [*records, {**records[1], "returncode": 0}])
    assert "tests" in _done(tmp_path, card)


def test_triton_cache_parts_round_trip(tmp_path):
    """The cache packed into small parts in one slot unpacks into the next slot's state folder unchanged."""
    from bench.triton_cache_parts import pack_cache, unpack_cache

    kernel = tmp_path / "slot1" / "triton" / "abc123"
    kernel.mkdir(parents=True)
    (kernel / "kernel.cubin").write_bytes(bytes(range(256)) * 64)
    for name in ("kernel.json", "__grp__kernel.json", "kernel.autotune.json", "kernel.ptx", "kernel.llir"):
        (kernel / name).write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    pack_cache(tmp_path / "slot1", out, part_mib=1)
    (tmp_path / "slot2").mkdir()  # run() makes the state folder before unpacking
    unpack_cache(tmp_path / "slot2", out)
    assert (tmp_path / "slot2" / "triton" / "abc123" / "kernel.cubin").read_bytes() == bytes(range(256)) * 64
    # what a cache hit reads travels; the intermediate IRs stay behind
    kept = {p.name for p in (tmp_path / "slot2" / "triton" / "abc123").iterdir()}
    assert kept == {"kernel.cubin", "kernel.json", "__grp__kernel.json", "kernel.autotune.json"}


def test_the_tests_part_is_done_only_when_every_gpu_test_file_has_a_record(tmp_path):
    """The GPU tests run one file per pytest process: a slot that ends mid-way leaves the part undone."""
    from bench.bench_gpu import GPU_TEST_FILES

    card = "NVIDIA H100 80GB HBM3"
    first = [{"part": "tests", "case": name, "returncode": 0, "card": card} for name in GPU_TEST_FILES[:2]]
    _write(tmp_path, first)
    assert "tests" not in _done(tmp_path, card)
    rest = [{"part": "tests", "case": name, "returncode": 0, "card": card} for name in GPU_TEST_FILES[2:]]
    _write(tmp_path, first + rest)
    assert "tests" in _done(tmp_path, card)


def test_greedy_self_consistency_tells_a_cached_generate_from_one_that_drops_its_state():
    """The check bench_decode runs on Hugging Face ``generate``: greedy tokens from a correct cache are what one
    uncached forward picks too; tokens from a decoder that forgets the prefix are not."""
    import torch

    from bench.bench_decode import _greedy_self_consistency
    from refine_core.models import DeltaNetConfig, SamplingConfig, build_model, generate

    torch.manual_seed(0)
    model = build_model(DeltaNetConfig(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=50)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # sharp logits: no near-ties
    prompt = torch.randint(3, 50, (4, 12))
    cached = generate(model, prompt, torch.ones_like(prompt), SamplingConfig(max_new_tokens=6), cuda_graph=False)
    assert _greedy_self_consistency(model, prompt, cached.tokens) == 1.0
    forgetful = torch.stack([  # each token chosen from the previous token alone, as a decoder without state would
        generate(model, prompt[:, -1:], None, SamplingConfig(max_new_tokens=1), cuda_graph=False).tokens[:, 0]
    ] * 6, 1)
    assert _greedy_self_consistency(model, prompt, forgetful) < 0.8
