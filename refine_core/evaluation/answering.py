"""Turning task prompts into model answers: truncation, batching, greedy decoding through the recurrent cache.

Used by ``refine evaluate`` and ``refine ttt``. Prompts are raw text without special tokens (spec §1), keep
their first tokens when too long (spec §1; §10.14 warns that this can cut the question off, so truncations are
counted and reported), are left-padded per batch, and are answered greedily up to the task's generation length,
stopping at EOS (spec §5).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from refine_core.data.batching import left_pad
from refine_core.models import FastWeightForCausalLM, SamplingConfig, generate
from refine_core.progress import Progress
from refine_core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class EncodedPrompt:
    ids: list[int]
    truncated: bool


def encode_prompt(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> EncodedPrompt:
    """Token ids of ``prompt`` without special tokens, keeping the first ``max_tokens`` (spec §1)."""
    ids = tokenizer.encode(prompt)
    return EncodedPrompt(ids=ids[:max_tokens], truncated=len(ids) > max_tokens)


@torch.no_grad()
def answer_prompts(
    model: FastWeightForCausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[None]] = nullcontext,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers (decoded, special tokens skipped) for token-id prompts, ``batch_size`` at a time.

    ``progress`` (:class:`refine_core.progress.Progress`) is advanced by the number of prompts of every batch.
    """
    was_training = model.training
    model.eval()
    answers: list[str] = []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    for lo in range(0, len(prompts), batch_size):
        ids, mask = left_pad([list(p) for p in prompts[lo : lo + batch_size]], tokenizer.pad_token_id)
        with autocast():
            out = generate(
                model,
                ids.to(model.device),
                mask.to(model.device),
                sampling,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row, length in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
            answers.append(tokenizer.decode(row[:length], skip_special_tokens=True))
        if progress is not None:
            progress.update(len(out.lengths))
    model.train(was_training)
    return answers
