"""Time one REFINE inner step with each rollout engine against the NTP-only step on the same documents.

    python bench/bench_refine_step.py --config configs/tiny-refine.yaml --repeats 5

Each case runs ``refine_step`` on the same batch (the config's ``refine.batch_size`` documents of the prepared
data, or synthetic token documents of ``--doc-tokens`` when no prepared data exists) with a fresh copy of the same
model and AdamW, and reports the median wall time of the step and its phase split; one JSON line per case.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace

import torch

from refine_core.config import load_config
from refine_core.models import build_model, config_from_dict
from refine_core.runtime import autocast, select_device
from refine_core.training.refine_step import refine_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-refine.yaml")
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = select_device(cfg.device)
    torch.manual_seed(0)
    fields = {"model_type": cfg.model.arch, "vocab_size": 259, "eos_token_id": 257, "pad_token_id": 256}
    base = build_model(config_from_dict({**fields, **cfg.model.config})).to(device).train()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 256, (args.doc_tokens,), generator=gen) for _ in range(cfg.refine.batch_size)]
    ids = list(range(len(docs)))
    cases = {
        "ntp-only (matched schedule)": replace(cfg.refine, nsp_update=False),
        "refine branch": replace(cfg.refine, engine="branch"),
        "refine faithful": replace(cfg.refine, engine="faithful"),
        "refine faithful, prefixes padded to full length": replace(
            cfg.refine, engine="faithful", pad_prefix_to_full_length=True
        ),
    }
    results = {}
    for name, rcfg in cases.items():
        times, phases = [], []
        for rep in range(args.repeats + 1):
            model = copy.deepcopy(base)
            opt = torch.optim.AdamW(model.parameters(), lr=rcfg.lr)
            t0 = time.perf_counter()
            metrics = refine_step(
                model,
                opt,
                docs,
                ids,
                rcfg,
                seed=0,
                step=rep,
                pad_id=256,
                eos_id=257,
                autocast=lambda: autocast(device, cfg.precision),
            )
            if rep:  # the first repeat warms up
                times.append(time.perf_counter() - t0)
                phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})
        results[name] = statistics.median(times)
        split = {k: round(statistics.median(p[k] for p in phases), 3) for k in phases[0]}
        print(
            json.dumps(
                {
                    "case": name,
                    "docs": len(docs),
                    "doc_tokens": args.doc_tokens,
                    "M": rcfg.num_chunks,
                    "k": rcfg.rollout_tokens,
                    "G": rcfg.rollouts_per_position,
                    "optimizer_steps": metrics["refine/optimizer_steps"],
                    "step_s_median": round(results[name], 3),
                    "step_s_min": round(min(times), 3),
                    "ratio_to_ntp": round(results[name] / results["ntp-only (matched schedule)"], 2),
                    **split,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
