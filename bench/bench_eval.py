"""CPU (or GPU) time per evaluated example: greedy answers to RULER QA prompts truncated to a token budget.

    python bench/bench_eval.py --model runs/tiny-deltanet/train-ntp/model \
        --file ../shared/data/ruler/ruler_squadqa_delta_net_4096_200_test.parquet --tokens 4064 --examples 16

Prints one JSON line per batch size: seconds per example, prompt tokens, new tokens generated.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refine_core.data.tasks import read_task_file
from refine_core.evaluation.answering import answer_prompts, encode_prompt
from refine_core.models import load_pretrained
from refine_core.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--tokens", type=int, default=4064)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_pretrained(args.model, device=args.device).eval()
    examples = read_task_file(args.file)[: args.examples]
    prompts = [encode_prompt(tokenizer, ex.prompt, args.tokens).ids for ex in examples]
    answer_prompts(model, tokenizer, prompts[:1], args.new_tokens, 1)  # warm-up
    for batch in args.batch:
        t0 = time.perf_counter()
        answers = answer_prompts(model, tokenizer, prompts, args.new_tokens, batch)
        elapsed = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "batch": batch,
                    "examples": len(prompts),
                    "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
                    "max_new_tokens": args.new_tokens,
                    "s_per_example": round(elapsed / len(prompts), 4),
                    "answer_chars_mean": sum(map(len, answers)) / len(answers),
                    "params_M": round(model.num_parameters() / 1e6, 2),
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
