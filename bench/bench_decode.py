"""Decoding throughput on one GPU: our CUDA-graph ``generate``, our eager ``generate``, and Hugging Face ``generate`` on
fla's own model class with the same weights; plus the step time as a fraction of the memory-bandwidth floor and the
recurrent kernel choice (fla's ``fused_recurrent`` against our torch recurrence) per batch size.

Why: rollouts and evaluation decode one token at a time. Eagerly that is launch-bound (the step time hardly depends on
the batch); with a CUDA graph a step should approach the bandwidth floor, the bytes that must move per step (weights
read once, every layer's recurrent state read and written) over the card's copy bandwidth.

CLI (bf16 weights, random tokens; one JSON line per batch size)::

    python bench/bench_decode.py --hidden 1024 --layers 8 --heads 8 --vocab 32000 --batch 8 64 256

From another script::

    from bench.bench_decode import measure_decode
    for row in measure_decode(model, batches=(8, 64, 256), prompt_tokens=128, new_tokens=128, repeats=3):
        print(row)  # one dict per batch size, yielded as soon as it is measured
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from refine_core.models import FastWeightForCausalLM, SamplingConfig, build_model, config_from_dict, generate
from refine_core.models.decoding import clear_decode_graphs, graphed_decode_step
from refine_core.models.ops import fla_backend

T = TypeVar("T")

# Greedy tokens compared with fla's generate: bf16 noise lets later tokens diverge once two logits nearly tie.
AGREEMENT_TOKENS = 8


def cuda_time_s(fn: Callable[[], T], repeats: int, warmup: int = 1) -> tuple[float, T]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, timed with CUDA events, and the last
    run's result (so that checking the outputs costs no extra run)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    result = None
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), result  # type: ignore[return-value]


def copy_bandwidth_gbs(device: torch.device | str = "cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The card's device-to-device copy bandwidth, GB/s: bytes read + written by a large ``copy_`` over its median
    time. The practical ceiling of a memory-bound decode step."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, _ = cuda_time_s(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * nbytes / seconds / 1e9


def decode_bandwidth_floor(model: FastWeightForCausalLM, batch: int) -> dict[str, int]:
    """Bytes one decode step must move at least: every weight read once, the recurrent and conv states read and
    written.

    The input embedding table is not read whole (only ``batch`` rows are), so it counts ``batch`` rows unless it is
    tied to the LM head (which reads it all). Activations ([B, D]-sized) are negligible and left out.
    """
    embedding = model.model.embeddings.weight
    tied = model.lm_head.weight is embedding
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)
    if not tied:
        weight_bytes += batch * embedding.shape[1] * embedding.element_size()
    with torch.no_grad():
        row = model(torch.zeros(1, 1, dtype=torch.long, device=embedding.device), use_cache=True).cache
    state_bytes = 2 * row.nbytes() * batch
    return {"weight_bytes": weight_bytes, "state_bytes": state_bytes, "bytes_per_step": weight_bytes + state_bytes}


def _step_seconds(model: FastWeightForCausalLM, prompt: torch.Tensor, steps: int, repeats: int) -> float:
    """Median seconds of one replay of the captured decode step (token copy included), over ``steps`` replays."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    step_fn = graphed_decode_step(model, prompt.shape[0], out.cache, None)
    step_fn.load(out.cache)
    tokens = out.logits[:, -1].argmax(-1)

    def run() -> None:
        for _ in range(steps):
            step_fn.feed(tokens)

    return cuda_time_s(run, repeats)[0] / steps


def _greedy_self_consistency(model: torch.nn.Module, prompt: torch.Tensor, generated: torch.Tensor) -> float:
    """The fraction of ``generated`` (greedy, cached) tokens that one uncached forward of prompt + generated also
    picks: about 1.0 when ``generate`` honours its cache, much lower when it silently drops the state (fla 0.6.0's
    ``generate`` did under transformers 5.24). Separates a broken baseline from near-tied logits of random weights."""
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, generated], 1), use_cache=False).logits
    picked = logits[:, prompt.shape[1] - 1 : -1].argmax(-1)
    return round(float((picked == generated).float().mean()), 4)


def _hf_model(model: FastWeightForCausalLM) -> torch.nn.Module:
    """fla's own class for ``model.config``, with ``model``'s weights (our state-dict keys are fla's)."""
    import fla.models  # noqa: F401  (registers fla's configs and models with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = model.config.to_dict()
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(model.device):
        theirs = AutoModelForCausalLM.from_config(config)
    theirs = theirs.to(model.dtype).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs


def measure_decode(
    model: FastWeightForCausalLM,
    batches: Sequence[int] = (8, 64, 256),
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Decoding throughput of ``model`` (on CUDA, in its own dtype, e.g. bf16) per batch size.

    Every generation is greedy, reads a random ``prompt_tokens`` prompt and makes exactly ``new_tokens`` tokens
    (EOS blocked: ``min_new_tokens = max_new_tokens``). Throughputs are new tokens per second of a whole
    ``generate`` call (prefill included, as a rollout pays it). ``step_ms`` is one replay of the captured step alone;
    ``fraction_of_bandwidth`` is the bandwidth floor's bytes per step over that time, over the copy bandwidth.
    The recurrent kernel comparison captures the step twice: with fla's ``fused_recurrent`` kernel and, under
    ``fla_backend.disabled()``, with our torch recurrence.

    Yields:
        One dict per batch size, as soon as it is measured (a slot that ends mid-way keeps the batches done).
    """
    if model.device.type != "cuda":
        raise ValueError(f"measure_decode needs a model on CUDA, not {model.device}")
    model.eval()
    vocab, eos = model.config.vocab_size, model.config.eos_token_id
    sampling = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    bandwidth = copy_bandwidth_gbs(model.device)
    theirs, hf_reason = None, None
    if not fla_backend.fla_available() or importlib.util.find_spec("fla.models") is None:
        hf_reason = "fla is not importable here"
    else:
        try:
            theirs = _hf_model(model)
        except Exception as exc:  # report, do not lose the other numbers
            hf_reason = f"building fla's model failed: {type(exc).__name__}: {exc}"
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        clear_decode_graphs()  # one batch's graphs at a time in memory
        prompt = torch.randint(3, vocab, (batch, prompt_tokens), generator=gen).to(model.device)
        new = batch * new_tokens

        def ours(cuda_graph: bool, prompt: torch.Tensor = prompt) -> torch.Tensor:
            return generate(model, prompt, sampling=sampling, eos_token_id=eos, cuda_graph=cuda_graph).tokens

        graph_s, graph_tokens = cuda_time_s(lambda: ours(True), repeats)
        eager_s, eager_tokens = cuda_time_s(lambda: ours(False), repeats)
        step_s = _step_seconds(model, prompt, new_tokens, repeats)
        floor = decode_bandwidth_floor(model, batch)
        with fla_backend.disabled():
            torch_graph_s, _ = cuda_time_s(lambda: ours(True), repeats)
            torch_step_s = _step_seconds(model, prompt, new_tokens, repeats)
        row: dict[str, Any] = {
            "batch": batch,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "tokens_per_s_graph": round(new / graph_s),
            "tokens_per_s_eager": round(new / eager_s),
            "graph_speedup_vs_eager": round(eager_s / graph_s, 2),
            "graph_equals_eager_fraction": float((graph_tokens == eager_tokens).float().mean()),
            "step_ms": round(step_s * 1e3, 3),
            **floor,
            "copy_bandwidth_gbs": round(bandwidth, 1),
            "fraction_of_bandwidth": round(floor["bytes_per_step"] / step_s / 1e9 / bandwidth, 3),
            "recurrent_kernel": {
                "fla_step_ms": round(step_s * 1e3, 3),
                "torch_step_ms": round(torch_step_s * 1e3, 3),
                "fla_tokens_per_s_graph": round(new / graph_s),
                "torch_tokens_per_s_graph": round(new / torch_graph_s),
                "faster": "fla" if step_s <= torch_step_s else "torch",
            },
        }
        if theirs is None:
            row.update(tokens_per_s_hf=None, speedup_vs_hf=None, hf_skipped=hf_reason)
        else:
            mask = torch.ones_like(prompt)

            def hf(prompt: torch.Tensor = prompt, mask: torch.Tensor = mask) -> torch.Tensor:
                with torch.no_grad():
                    out = theirs.generate(
                        input_ids=prompt,
                        attention_mask=mask,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        use_cache=True,
                        eos_token_id=eos,
                        pad_token_id=eos,
                    )
                return out[:, prompt.shape[1] :]

            hf_s, hf_tokens = cuda_time_s(hf, repeats)
            n = min(AGREEMENT_TOKENS, new_tokens)
            same = hf_tokens[:, :n] == graph_tokens[:, :n]
            row.update(
                tokens_per_s_hf=round(new / hf_s),
                speedup_vs_hf=round(hf_s / graph_s, 2),
                hf_new_tokens=hf_tokens.shape[1],
                hf_agreement_first_tokens=n,
                hf_agreement_fraction=round(float(same.float().mean()), 4),
                hf_rows_identical_fraction=round(float(same.all(-1).float().mean()), 4),
                hf_self_consistency=_greedy_self_consistency(theirs, prompt, hf_tokens[:, :n]),
            )
        clear_decode_graphs()
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="delta_net")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode measures CUDA decoding; no CUDA device here")
    fields: dict[str, Any] = {
        "model_type": args.arch,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_heads": args.heads,
        "vocab_size": args.vocab,
    }
    if args.arch == "gated_deltanet":
        fields.update(head_dim=args.hidden // args.heads, expand_v=1.0)
    torch.manual_seed(0)
    model = build_model(config_from_dict(fields)).cuda().to(torch.bfloat16).eval()
    base = {
        "arch": model.config.model_type,
        "params_M": round(model.num_parameters() / 1e6, 1),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    for row in measure_decode(model, args.batch, args.prompt, args.new, args.repeats):
        print(json.dumps({**base, **row}), flush=True)


if __name__ == "__main__":
    main()
