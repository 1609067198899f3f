"""Token generation through the recurrent state cache.

The prompt is read once (prefill); each new token is then fed alone with the cache, so the cost per new token is
independent of the prompt length. Left-padded batches are exact (padding is masked inside the layers). Sampling
uses an explicit ``torch.Generator`` so that rollouts can be replayed (REFINE saves it in checkpoints).

We own this loop because fla 0.6.0's ``generate`` silently ignores its cache under transformers 5.24
(models-notes §1.7) and LaCT's has no cache at all.

On CUDA the per-token model step is replayed from a captured CUDA graph (:mod:`refine_core.models.decoding`): the
eager step is launch-bound on a GPU. The graph loop keeps the eager loop's results exactly (tokens, lengths, the
returned cache, the generator's state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_core.models.cache import FastWeightCache
from refine_core.models.decoding import StaticDecodeStep, graphed_decode_step, supports_static_decoding

# In graph mode the host reads "have all rows finished?" only every this many steps: each read is a device sync,
# which empties the launch queue that lets the CPU run ahead of the GPU.
FINISHED_CHECK_EVERY = 8


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
    cuda_graph: bool | None = None,
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
        cuda_graph: replay each decode step from a captured CUDA graph (same results, far fewer launches).
            ``None`` (auto): when ``model`` is an ``nn.Module`` on CUDA and ``max_new_tokens >= 2``; ``False``:
            eager; ``True`` on CPU raises ``ValueError``. Under CUDA autocast the graph runs the step in the
            current autocast dtype.

    Returns:
        The new tokens, their lengths, and the cache after feeding all but the last new token.
    """
    cfg = sampling or SamplingConfig()
    use_graph = _use_cuda_graph(model, input_ids, cfg, cuda_graph)
    batch = input_ids.shape[0]
    device = input_ids.device
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if input_ids.shape[1] > 0:
        # Only the last position's logits: a [B, T, V] prefill (8 GB for 8 rows of 16K tokens) is never needed.
        out = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, return_logits=False)
        cache, next_logits = out.cache, model.lm_head(out.hidden_states[:, -1])
    elif cache is None or next_logits is None:
        raise ValueError("generate needs a non-empty prompt, or both cache and next_logits to continue from")
    if use_graph:
        autocast_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        step_fn = graphed_decode_step(model, batch, cache, autocast_dtype)
        return _decode_static(step_fn, cfg, cache, next_logits, eos_token_id, pad, generator, uniforms)

    tokens = torch.full((batch, cfg.max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), cfg.max_new_tokens, dtype=torch.long, device=device)
    for step in range(cfg.max_new_tokens):
        new, lengths = _pick_step(next_logits, step, cfg, eos_token_id, pad, generator, uniforms, finished, lengths)
        tokens[:, step] = new
        if eos_token_id is not None and bool(finished.all()):
            break
        if step + 1 < cfg.max_new_tokens:
            out = model(new[:, None], cache=cache, use_cache=True)
            cache, next_logits = out.cache, out.logits[:, -1]
    return GenerationOutput(tokens=tokens, lengths=lengths, cache=cache)


def _pick_step(
    next_logits: torch.Tensor,
    step: int,
    cfg: SamplingConfig,
    eos_token_id: int | None,
    pad: int,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None,
    finished: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's tokens (EOS blocked before ``min_new_tokens``, pad after a row's EOS) and the updated lengths;
    ``finished`` is updated in place. Shared by the eager and the graph loops, which must pick the same tokens."""
    logits = next_logits.float()
    if eos_token_id is not None and step < cfg.min_new_tokens:
        logits = logits.clone()
        logits[:, eos_token_id] = float("-inf")
    new = pick_tokens(logits, cfg, generator, None if uniforms is None else uniforms[:, step])
    new = torch.where(finished, torch.full_like(new, pad), new)
    if eos_token_id is not None:
        just_done = (new == eos_token_id) & ~finished
        lengths = torch.where(just_done, torch.full_like(lengths, step + 1), lengths)
        finished |= just_done
    return new, lengths


def _use_cuda_graph(model: object, input_ids: torch.Tensor, cfg: SamplingConfig, cuda_graph: bool | None) -> bool:
    """Resolve ``generate``'s ``cuda_graph`` argument (see there)."""
    if cuda_graph is False:
        return False
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    on_cuda = param is not None and param.is_cuda and input_ids.is_cuda
    if cuda_graph and not on_cuda:
        if not isinstance(model, torch.nn.Module):
            where = "is not an nn.Module"
        else:
            where = f"on {param.device}" if param is not None else "has no parameters"
        raise ValueError(
            f"cuda_graph=True needs an nn.Module model and input_ids on a CUDA device (model {where}, input_ids on "
            f"{input_ids.device}); pass cuda_graph=None (auto) or cuda_graph=False to decode eagerly"
        )
    if not supports_static_decoding(model):
        if cuda_graph:
            raise ValueError(
                f"cuda_graph=True: {model.config.model_type} decodes eagerly (no static decode step); pass "
                "cuda_graph=None (auto) or cuda_graph=False"
            )
        return False
    # fewer than 2 new tokens feed nothing through the model; inside someone else's capture, stay eager
    return on_cuda and cfg.max_new_tokens >= 2 and not torch.cuda.is_current_stream_capturing()


def _decode_static(
    step_fn: StaticDecodeStep,
    cfg: SamplingConfig,
    start: FastWeightCache,
    next_logits: torch.Tensor,
    eos_token_id: int | None,
    pad: int,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None,
) -> GenerationOutput:
    """``generate``'s loop over a static decode step (a CUDA graph, or its eager twin in the CPU tests).

    Same picks as the eager loop, but "all rows finished?" (a device sync) is read only every
    :data:`FINISHED_CHECK_EVERY` steps. Steps picked after every row finished only add pad tokens, but the state
    must be the eager one (fed up to the step where the last row finished): the static state is copied at the start
    of each window in which that can happen, and on an early finish it is rolled back and the window's tokens are
    fed again (replays are deterministic). When sampling draws from an RNG the flag is read every step instead,
    so that the generator ends where the eager loop leaves it.
    """
    n = cfg.max_new_tokens
    batch, device = step_fn.batch, step_fn.device
    tokens = torch.full((batch, n), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), n, dtype=torch.long, device=device)
    step_fn.load(start)
    every = 1 if cfg.do_sample and uniforms is None else FINISHED_CHECK_EVERY
    fed = 0  # tokens fed through the static step: its state is the cache after tokens[:, :fed]
    snapshot: list[torch.Tensor] | None = None
    snapshot_fed = 0
    for step in range(n):
        window_end = min(step - step % every + every - 1, n - 1)
        if eos_token_id is not None and step % every == 0:
            # The last row can finish at a step in [max(step, min_new_tokens), window_end]; only a finish before
            # window_end needs a rollback.
            snapshot = step_fn.snapshot() if max(step, cfg.min_new_tokens) < window_end else None
            snapshot_fed = fed
        new, lengths = _pick_step(next_logits, step, cfg, eos_token_id, pad, generator, uniforms, finished, lengths)
        tokens[:, step] = new
        if eos_token_id is not None and step == window_end and bool(finished.all()):
            done_at = int(lengths.max()) - 1  # the step at which the eager loop stopped
            # (no snapshot: EOS was blocked up to window_end, so done_at == fed; only NaN logits could differ)
            if done_at < fed and snapshot is not None:
                step_fn.restore(snapshot)
                for t in range(snapshot_fed, done_at):
                    step_fn.feed(tokens[:, t])
                fed = done_at
            break
        if step + 1 < n:
            next_logits = step_fn.feed(new)
            fed += 1
    cache = step_fn.cache(start.seen_tokens + fed) if fed else start
    return GenerationOutput(tokens=tokens, lengths=lengths, cache=cache)
