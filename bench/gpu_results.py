"""What ``bench/bench_gpu.py`` measured: the records of ``results.jsonl``, its headline figures and tables.

Kept apart from the measurements so that reading results needs neither torch nor a GPU (and stays tested on CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _part_key(record: dict) -> str:
    """The ``PARTS`` name a record was measured under (older records lack it: their own ``part`` name)."""
    return record.get("part_key") or record["part"]


def _records(state: Path) -> list[dict]:
    path = state / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _card_records(state: Path, card: str | None) -> tuple[str | None, list[dict]]:
    """One card (default: the newest record's) and its records: figures are never mixed across cards."""
    records = _records(state)
    card = card or next((r.get("card") for r in reversed(records) if r.get("card")), None)
    return card, [r for r in records if r.get("card") == card]


def summarize(args: argparse.Namespace) -> dict:
    """The issue's headline figures from ``results.jsonl``; written to ``--latest`` when given."""
    card, records = _card_records(Path(args.state), args.card)
    env = next((r for r in reversed(records) if r["part"] == "env"), {})

    # The newest record of a measurement wins (a part measured again after a change replaces the older figure).
    def step(part: str, case: str) -> dict:
        return next(
            (r for r in reversed(records) if r["part"] == part and r.get("case") == case and "error" not in r), {}
        )

    def decode(part: str, batch: int) -> dict:
        return next((r for r in reversed(records) if r["part"] == part and r.get("batch") == batch), {})

    peak = env.get("dense_bf16_tflops_datasheet")
    ntp13 = step("steps-1p3b-16k", "ntp")
    cold = next((r for r in reversed(records) if r["part"].startswith("cold-")), {})
    warm = next((r for r in reversed(records) if r["part"].startswith("warm-")), {})
    latest = {
        "card": card, "date": env.get("date"), "torch": env.get("torch"), "triton": env.get("triton"),
        "fla": env.get("fla"), "transformers": env.get("transformers"),
        "refine_branch_over_ntp_340m_4k": step("steps-340m-4k", "branch").get("ratio_to_ntp"),
        "refine_faithful_over_ntp_340m_4k": step("steps-340m-4k", "faithful").get("ratio_to_ntp"),
        "refine_branch_over_ntp_1p3b_16k": step("steps-1p3b-16k", "branch").get("ratio_to_ntp"),
        "refine_faithful_over_ntp_1p3b_16k": step("steps-1p3b-16k", "faithful").get("ratio_to_ntp"),
        "ntp_tok_s_1p3b_16k": ntp13.get("tokens_per_s"),
        "ntp_mfu_1p3b_16k": (round(ntp13["achieved_tflops"] / peak, 4) if ntp13 and peak else None),
        "ntp_mfu_of_measured_matmul_1p3b_16k": (
            round(ntp13["achieved_tflops"] / env["matmul_tflops"], 4) if ntp13 and env.get("matmul_tflops") else None
        ),
        "decode_speedup_vs_hf_b64": decode("decode-340m", 64).get("speedup_vs_hf"),
        "decode_fraction_of_bandwidth_b64": decode("decode-340m", 64).get("fraction_of_bandwidth"),
        "decode_fraction_of_bandwidth_b256": decode("decode-340m", 256).get("fraction_of_bandwidth"),
        "refine_peak_mem_gib_1p3b_16k": step("steps-1p3b-16k", "branch").get("peak_mem_gib"),
        "first_step_s_cold": cold.get("first_refine_step_s"),
        "first_step_s_warm": warm.get("first_refine_step_s"),
        "steady_step_s": warm.get("steady_refine_step_s"),
        # the process's very first step (NTP) also pays CUDA/cuBLAS start-up and loading every cached kernel
        "first_ntp_step_s_cold": cold.get("first_ntp_step_s"),
        "first_ntp_step_s_warm": warm.get("first_ntp_step_s"),
        "steady_ntp_step_s_warm": warm.get("steady_ntp_step_s"),
        # the same ratio from the first-steps part (its steps 1-3 after the first; 8 documents, one mini-batch)
        "steady_refine_over_ntp_340m_4k_first_steps_part": next(
            (round(r["steady_refine_step_s"] / r["steady_ntp_step_s"], 2) for r in (warm, cold) if r), None
        ),
        # LaCT-760M (the paper's checkpoint shape) at 16K: issue 12's device figures
        "lact760m_16k_ntp_step_s": step("steps-lact760m-16k", "ntp").get("step_s"),
        "lact760m_16k_branch_step_s": step("steps-lact760m-16k", "branch").get("step_s"),
        "lact760m_16k_branch_over_ntp": step("steps-lact760m-16k", "branch").get("ratio_to_ntp"),
        "lact760m_16k_refine_peak_mem_gib": step("steps-lact760m-16k", "branch").get("peak_mem_gib"),
        "parts_done": sorted({_part_key(r) for r in records}),
        "commits": sorted({r["commit"] for r in records if r.get("commit")}),
    }
    print(json.dumps(latest, indent=1))
    if getattr(args, "latest", None):
        Path(args.latest).write_text(json.dumps(latest, indent=1) + "\n")
    return latest


def tables(args: argparse.Namespace) -> None:
    """Markdown tables of everything in ``results.jsonl`` (for BENCHMARKS.md)."""
    _, records = _card_records(Path(args.state), args.card)
    env = next((r for r in reversed(records) if r["part"] == "env"), {})
    peak = env.get("dense_bf16_tflops_datasheet") or float("nan")
    matmul = env.get("matmul_tflops") or float("nan")
    print(f"{env.get('card')}, {env.get('date')}, torch {env.get('torch')}, triton {env.get('triton')}, fla "
          f"{env.get('fla')}, transformers {env.get('transformers')}; copy {env.get('copy_gbs')} GB/s, bf16 matmul "
          f"{matmul} TFLOP/s (datasheet {peak})\n")
    print("| model | tokens | docs (mini/micro) | case | step (median) | × NTP | tokens/s | MFU (datasheet / matmul) "
          "| peak GiB | entropy / rollout / update (policy forward, backward) s | compiles after step 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if not r["part"].startswith("steps-"):
            continue
        if "error" in r:
            print(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['case']} | {r['error'][:60]} |||||||")
            continue
        mfu = (f"{r['achieved_tflops'] / peak:.1%} / {r['achieved_tflops'] / matmul:.1%}"
               if "achieved_tflops" in r else "")
        phases = " / ".join(f"{r.get(k, 0):.3f}" for k in ("time/entropy_s", "time/rollout_s", "time/update_s"))
        phases += f" ({r.get('time/policy_forward_s', 0):.3f}, {r.get('time/backward_s', 0):.3f})"
        print(f"| {r['model']} | {r['seq']} | {r['batch']} ({r['mini']}/{r['micro']}) | {r['case']} | "
              f"{r['step_s']:.3f} s | {r['ratio_to_ntp']} | {r['tokens_per_s']:,} | {mfu} | {r['peak_mem_gib']} | "
              f"{phases if r['case'] != 'ntp' else ''} | {r['triton_compiles_after_first_step']} |")
    decode = [r for r in records if r["part"].startswith("decode-")]
    if decode:
        print("\n| model | batch | ours, graph tok/s | ours, eager tok/s | HF generate (fla) tok/s | × HF | step ms "
              "| fraction of bandwidth floor | HF greedy agreement |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in decode:
            print(f"| {r['model']} | {r['batch']} | {r.get('tokens_per_s_graph')} | {r.get('tokens_per_s_eager')} | "
                  f"{r.get('tokens_per_s_hf')} | {r.get('speedup_vs_hf')} | {r.get('step_ms')} | "
                  f"{r.get('fraction_of_bandwidth')} | {r.get('hf_agreement_fraction')} |")
    for r in records:
        if r["part"].startswith(("cold-", "warm-")):
            print(f"\n{r['part']}: " + json.dumps({k: v for k, v in r.items() if k != "part"}))
        if r["part"].startswith("profile-"):
            print(f"\n{r['part']} {r['case']}: wall {r['wall_ms_profiled']} ms, GPU busy {r['gpu_busy_ms']} ms, "
                  f"{r['kernel_launches']} launches, phases {r['phases']}")
            for k in r["top_kernels"][:10]:
                print(f"    {k['ms']:8.2f} ms {k['share']:6.1%} x{k['calls']:<5} {k['kernel']}")
        if r["part"] == "tests":
            name = f"tests/gpu/test_{r['case']}.py" if r.get("case") else "tests"
            print(f"\n{name}: exit {r['returncode']}", *r["summary"], sep="\n    ")
