"""Token generation through the recurrent state cache.

The prompt is read once (prefill); each new token is then fed alone with the cache, so the cost per new token is
independent of the prompt length. Left-padded batches are exact (padding is masked inside the layers). Sampling
uses an explicit ``torch.Generator`` so that rollouts can be replayed (REFINE saves it in checkpoints).

We own this loop because fla 0.6.0's ``generate`` silently ignores its cache under transformers 5.24
(models-notes §1.7) and LaCT's has no cache at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_core.models.cache import FastWeightCache


@dataclass
class SamplingConfig:
    """How to pick each new token. ``do_sample=False`` is greedy decoding."""

    max_new_tokens: int = 32
    # EOS is blocked until this many tokens exist (REFINE rollouts: min = max = k, spec §2 step 2).
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("max_new_tokens and min_new_tokens must be >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, N] new tokens; positions after EOS hold the pad id
    lengths: torch.Tensor  # [B] new tokens up to and including EOS
    cache: FastWeightCache | None  # state after the last fed token (all N tokens have been read but the last)


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of ``[B, V]`` logits, in float32."""
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token is always kept.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from ``[B, V]`` logits (already EOS-masked when needed).

    With ``uniforms`` (``[B]`` in [0, 1)) a row's token is the inverse CDF of its distribution at its own uniform,
    so each row's draw depends only on that row: sampling is the same whether a row is decoded alone or in a
    batch, in any order (REFINE's two rollout engines batch rollouts differently and must sample the same ones).
    """
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = process_logits(logits, cfg).softmax(-1)
    if uniforms is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.cumsum(-1)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cache: FastWeightCache | None = None,
    next_logits: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> GenerationOutput:
    """Continue each row of ``input_ids`` by up to ``sampling.max_new_tokens`` tokens.

    Args:
        model: a :class:`~refine_core.models.causal_lm.FastWeightForCausalLM`.
        input_ids: ``[B, T]`` left-padded prompts. May be ``[B, 0]`` when ``cache`` and ``next_logits`` are given
            (continue from a state computed elsewhere, e.g. a branch point).
        attention_mask: ``[B, T]``, 1 for real tokens.
        sampling: decoding settings (greedy by default).
        eos_token_id: stops a row (and is blocked before ``min_new_tokens``); ``None`` never stops early.
        pad_token_id: fills a row after its EOS (defaults to ``eos_token_id`` or 0).
        generator: RNG for sampling; on the model's device.
        cache: state before ``input_ids`` (not modified).
        next_logits: ``[B, V]`` logits for the first new token when ``input_ids`` is empty.
        uniforms: ``[B, max_new_tokens]`` per-row random numbers for batch-invariant sampling (see
            :func:`pick_tokens`); overrides ``generator``.

    Returns:
        The new tokens, their lengths, and the cache after feeding all but the last new token.
    """
    cfg = sampling or SamplingConfig()
    batch = input_ids.shape[0]
    device = input_ids.device
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if input_ids.shape[1] > 0:
        out = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        cache, next_logits = out.cache, out.logits[:, -1]
    elif cache is None or next_logits is None:
        raise ValueError("generate needs a non-empty prompt, or both cache and next_logits to continue from")

    tokens = torch.full((batch, cfg.max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), cfg.max_new_tokens, dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        logits = next_logits.float()
        if eos_token_id is not None and step < cfg.min_new_tokens:
            logits = logits.clone()
            logits[:, eos_token_id] = float("-inf")
        new = pick_tokens(logits, cfg, generator, None if uniforms is None else uniforms[:, step])
        new = torch.where(finished, torch.full_like(new, pad), new)
        tokens[:, step] = new
        if eos_token_id is not None:
            just_done = (new == eos_token_id) & ~finished
            lengths = torch.where(just_done, torch.full_like(lengths, step + 1), lengths)
            finished |= just_done
            if bool(finished.all()):
                break
        if step + 1 < cfg.max_new_tokens:
            out = model(new[:, None], cache=cache, use_cache=True)
            cache, next_logits = out.cache, out.logits[:, -1]
    return GenerationOutput(tokens=tokens, lengths=lengths, cache=cache)
