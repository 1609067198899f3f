"""Time one forward+backward and a cached generation of a fast-weight LM; prints one JSON line per case.

CPU, the tiny configs (the numbers in BENCHMARKS.md)::

    python bench/bench_model.py --config configs/tiny-deltanet.yaml --seq 512 --batch 1 4
    python bench/bench_model.py --config configs/tiny-gated-deltanet.yaml --seq 512 --batch 1 4

GPU, fla kernels against our PyTorch path on the same card::

    python bench/bench_model.py --arch delta_net --hidden 1024 --layers 8 --heads 8 --vocab 32000 \
        --seq 4096 --batch 2 --device cuda --backends fla torch
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from refine_core.config import load_config
from refine_core.models import SamplingConfig, build_model, config_from_dict, generate
from refine_core.models.ops import fla_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a run config whose model section is used (vocab 259, the byte tokenizer)")
    parser.add_argument("--arch", default="delta_net")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["default"], help="fla, torch or default")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()

    if args.config:
        cfg = load_config(args.config)
        fields = {"model_type": cfg.model.arch, "vocab_size": 259, "eos_token_id": 257, **cfg.model.config}
    else:
        fields = {
            "model_type": args.arch,
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "num_heads": args.heads,
            "vocab_size": args.vocab,
        }
        if args.arch == "gated_deltanet":
            fields.update(head_dim=args.hidden // args.heads, expand_v=1.0)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(config_from_dict(fields)).to(device).train()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    vocab = model.config.vocab_size

    for backend in args.backends:
        for batch in args.batch:
            # a fresh context per use: a generator-based context manager cannot be entered twice
            ctx = fla_backend.disabled() if backend == "torch" else nullcontext()
            ids = torch.randint(0, vocab, (batch, args.seq), device=device)

            def step(ids=ids):
                with amp:
                    logits = model(ids).logits
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                model.zero_grad(set_to_none=True)

            prompt = ids[:, :128]

            def gen(prompt=prompt):
                with amp:
                    generate(model, prompt, sampling=SamplingConfig(max_new_tokens=args.gen_tokens))

            with ctx:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                fwd_bwd = _time(step, device, args.repeats, args.warmup)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
                gen_t = _time(gen, device, max(3, args.repeats // 3), 1)
            print(
                json.dumps(
                    {
                        "arch": model.config.model_type,
                        "params_M": round(model.num_parameters() / 1e6, 2),
                        "backend": backend,
                        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "threads": torch.get_num_threads(),
                        "batch": batch,
                        "seq": args.seq,
                        "fwd_bwd_ms_min": round(min(fwd_bwd) * 1e3, 1),
                        "fwd_bwd_ms_median": round(statistics.median(fwd_bwd) * 1e3, 1),
                        f"generate_{args.gen_tokens}_ms_median": round(statistics.median(gen_t) * 1e3, 1),
                        "peak_gib": None if peak is None else round(peak, 2),
                        "torch": torch.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
