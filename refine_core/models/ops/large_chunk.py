"""LaCT's large-chunk fast-weight update ("apply, then update") as a recurrence that can stop and resume anywhere.

The fast weight of one head is a SwiGLU MLP ``f_W(x) = W1 (silu(W0 x) * (W2 x))`` (upstream ``ttt_operation.py``,
models-notes §2.2). The tokens are read in chunks of ``C``: every token of chunk ``c`` is answered by ``f_{W_c}``,
then chunk ``c``'s keys and values move the weights, ``W_{c+1} = norm(W_c + dW_c)`` with

    dW0 = sum_t dgate_t (lr0_t k_t)^T,   dW1 = sum_t v_t (lr1_t h_t)^T,   dW2 = sum_t dhid_t (lr2_t k_t)^T

(the analytic gradient of ``-sum_t lr_t <f_W(k_t), v_t>``, its SiLU backward written out), plus momentum
(``dW += m_c dW_prev``, ``m_c`` the chunk's mean gate), optionally Muon (``dW`` orthogonalised by five Newton–Schulz
steps) and the renormalisation of every row of ``W`` to the norm of the initial weight (post-norm; pre-norm keeps an
unnormalised ``W_main`` and applies its normalised copy).

Upstream runs a whole sequence at once and never updates after its last chunk. For decoding and for REFINE's branch
rollouts the same function must resume from a state: :class:`TTTState` holds the weights after the last *complete*
chunk, their momentum, and the partial chunk's gradient sum so far (the gradient is a sum over tokens taken at fixed
``W``, so it accumulates token by token). A chunk is folded in as soon as it is complete. The outputs are those of
upstream's one pass, token for token; only when the state is kept does the update after a final complete chunk
happen earlier than upstream would do it (when the next token arrives), which changes nothing that is computed.

Rows may be at different points of their chunks (left padding, continuing rows of different lengths): a *segment*
``s`` is the ``s``-th chunk of every row counted from that row's own chunk start, and rows whose segment is
incomplete simply keep their weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from refine_core.models.ops.cut_states import to_device_nonblocking as _dev

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_NS_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / (||x|| + 1e-5)`` over the last dim, the norm in float32 or wider (upstream ``l2_norm``)."""
    norm = x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=-1, keepdim=True)
    return (x / (norm + 1e-5)).to(x.dtype)


def newton_schulz5(g: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalisation of each matrix of ``g`` ``[N, a, b]`` (upstream ``zeropower_via_newtonschulz5``).

    Upstream iterates in bfloat16; so do we, except for float64 inputs (the exactness tests), which stay float64.
    """
    x = g if g.dtype == torch.float64 else g.bfloat16()
    tall = g.shape[1] > g.shape[2]
    if tall:
        x = x.transpose(1, 2)
    x = x / (x.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for a, b, c in _NS_COEFFICIENTS:
        gram = x @ x.transpose(1, 2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.transpose(1, 2)
    return x.to(g.dtype)


def swiglu_apply(w: Triple, x: torch.Tensor) -> torch.Tensor:
    """``f_W(x)`` for rows ``x`` ``[N, L, d]`` and weights ``W0, W2`` ``[N, h, d]``, ``W1`` ``[N, d, h]``."""
    w0, w1, w2 = w
    return (F.silu(x @ w0.transpose(1, 2).to(x.dtype)) * (x @ w2.transpose(1, 2).to(x.dtype))) @ w1.transpose(
        1, 2
    ).to(x.dtype)


def chunk_gradients(w: Triple, k: torch.Tensor, v: torch.Tensor, lr: Triple) -> Triple:
    """``(dW0, dW1, dW2)`` of one chunk: keys/values ``[N, L, d]``, learning rates ``[N, L, 1]`` (0 = no token)."""
    w0, w1, w2 = (t.to(k.dtype) for t in w)
    lr0, lr1, lr2 = lr
    gate_pre = k @ w0.transpose(1, 2)  # [N, L, h]
    hidden_pre = k @ w2.transpose(1, 2)
    gate = F.silu(gate_pre)
    hidden = gate * hidden_pre
    d_hidden = v @ w1  # [N, L, h]
    d_hidden_pre = d_hidden * gate
    sig = torch.sigmoid(gate_pre)
    d_gate_pre = d_hidden * hidden_pre * sig * (1 + gate_pre * (1 - sig))
    # the learning rates are float32; upstream casts each scaled operand back to the matmul dtype
    dw1 = v.transpose(1, 2) @ (hidden * lr1).to(k.dtype)  # [N, d, h]
    dw0 = d_gate_pre.transpose(1, 2) @ (k * lr0).to(k.dtype)  # [N, h, d]
    dw2 = d_hidden_pre.transpose(1, 2) @ (k * lr2).to(k.dtype)
    return dw0, dw1, dw2


@dataclass
class TTTState:
    """Where one layer's fast weights stand for ``N`` rows (batch × heads): see the module docstring."""

    w: Triple  # the weights that answer the current chunk
    main: Triple | None  # pre-norm only: the unnormalised weights
    momentum: Triple | None  # the last update (before Muon), when momentum is on
    grad: Triple  # the current chunk's gradient sum so far
    gate_sum: torch.Tensor  # [N, 1, 1] its momentum gates summed
    count: torch.Tensor  # [N] long, CPU: its tokens so far (0 <= count < C)


def initial_state(w: Triple, *, prenorm: bool, momentum: bool, gate_dtype: torch.dtype) -> TTTState:
    """The state before any token: the slow initial weights ``w`` (already expanded to ``N`` rows)."""
    zeros = tuple(torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in w)
    n = w[0].shape[0]
    return TTTState(
        w=w, main=w if prenorm else None, momentum=zeros if momentum else None, grad=zeros,
        gate_sum=w[0].new_zeros(n, 1, 1, dtype=gate_dtype), count=torch.zeros(n, dtype=torch.long),
    )


def _fold(state: TTTState, dw: Triple, gate_mean: torch.Tensor | None, norms: Triple, use_muon: bool, rows: torch.Tensor
          ) -> TTTState:
    """The weights after one complete chunk with gradient ``dw``, for the rows where ``rows`` ``[N]`` is True."""
    keep = rows.view(-1, 1, 1)
    momentum = state.momentum
    if momentum is not None:
        dw = tuple(d + m * gate_mean for d, m in zip(dw, momentum, strict=True))
        momentum = tuple(torch.where(keep, d, m) for d, m in zip(dw, momentum, strict=True))
    if use_muon:
        dw = tuple(newton_schulz5(d) for d in dw)
    base = state.main if state.main is not None else state.w
    moved = tuple(b + d.to(b.dtype) for b, d in zip(base, dw, strict=True))
    normed = tuple(m / (m.norm(dim=2, keepdim=True) + 1e-5) * n for m, n in zip(moved, norms, strict=True))
    w = tuple(torch.where(keep, new, old) for new, old in zip(normed, state.w, strict=True))
    main = None if state.main is None else tuple(
        torch.where(keep, new, old) for new, old in zip(moved, state.main, strict=True)
    )
    return replace(state, w=w, main=main, momentum=momentum)


def _segment_index(real: torch.Tensor, count: torch.Tensor, length: int, chunk: int, s: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded positions ``[N, width]`` of segment ``s``'s tokens per row, and which of them are real."""
    start = torch.clamp(s * chunk - count, min=0)  # index among the row's new real tokens
    stop = torch.minimum((s + 1) * chunk - count, real)
    n_tokens = (stop - start).clamp(min=0)
    width = int(n_tokens.max()) if n_tokens.numel() else 0
    steps = torch.arange(width)
    index = (length - real + start)[:, None] + steps
    return index.clamp(0, max(length - 1, 0)), steps < n_tokens[:, None]


def large_chunk_ttt(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: Triple,
    gate: torch.Tensor | None,
    state: TTTState,
    *,
    real: torch.Tensor,
    chunk: int,
    norms: Triple,
    use_muon: bool,
    keep_state: bool,
    record: bool = False,
) -> tuple[torch.Tensor, TTTState | None, list[TTTState]]:
    """Answer and learn from the new tokens of ``N`` rows, continuing from ``state``.

    Args:
        q, k, v: ``[N, T, d]`` left-padded: row ``n``'s last ``real[n]`` positions are its new tokens, in order.
        lr: three ``[N, T, 1]`` learning rates (float32); gate: ``[N, T, 1]`` momentum gates, or None.
        real: ``[N]`` long, CPU.
        norms: the row norms ``[N, h or d, 1]`` every update renormalises to (those of the initial weights).
        keep_state: return the state after the tokens (else ``None``; no update after the last segment is made).
        record: also return the state at the start of every segment (REFINE's cut states read them).

    Returns:
        ``(o [N, T, d]`` (zeros at pads), the state after the tokens or None, the states at segment starts``)``.
    """
    N, T, _ = q.shape
    count, real = state.count, real.to(torch.long)
    total = count + real
    segments = -(-int(total.max()) // chunk) if N else 0
    aligned = bool((count == 0).all() and (real == T).all())
    out = None  # made from the first answers: under autocast they are bf16 whatever q is
    pieces, starts = [], []
    for s in range(segments):
        if record:
            starts.append(state)
        if aligned:
            sl = slice(s * chunk, min((s + 1) * chunk, T))
            qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
            lrs = tuple(x[:, sl] for x in lr)
            gs = None if gate is None else gate[:, sl]
            valid = None
        else:
            index, valid_cpu = _segment_index(real, count, T, chunk, s)
            index, valid = _dev(index, q.device), _dev(valid_cpu, q.device)
            take = lambda x, index=index: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
            qs, ks, vs = take(q), take(k), take(v)
            lrs = tuple(take(x) * valid[..., None] for x in lr)
            gs = None if gate is None else take(gate) * valid[..., None]
        o = swiglu_apply(state.w, qs)
        if aligned:
            pieces.append(o)
        else:
            out = o.new_zeros(N, T, o.shape[-1]) if out is None else out
            out = out.scatter_add(1, index[..., None].expand_as(o), o * valid[..., None].to(o.dtype))
        if s == segments - 1 and not (keep_state or record):
            continue  # upstream never learns from the last chunk: nothing reads the result
        complete = total >= (s + 1) * chunk  # rows whose segment s is a whole chunk (CPU: no device sync)
        grads = tuple(a + b.to(a.dtype) for a, b in zip(state.grad, chunk_gradients(state.w, ks, vs, lrs), strict=True))
        gate_sum = state.gate_sum if gs is None else state.gate_sum + gs.sum(1, keepdim=True).to(state.gate_sum.dtype)
        rows = _dev(complete, q.device)
        if bool(complete.any()):
            state = _fold(state, grads, gate_sum / chunk, norms, use_muon, rows)
        keep = rows.view(-1, 1, 1)
        state = replace(
            state,
            grad=tuple(torch.where(keep, torch.zeros_like(g), g) for g in grads),
            gate_sum=torch.where(keep, torch.zeros_like(gate_sum), gate_sum),
        )
    if record:
        starts.append(state)  # after the last segment: the start of the next one
    state = replace(state, count=total % chunk)
    if aligned:
        out = torch.cat(pieces, 1) if pieces else q.new_zeros(v.shape)
    elif out is None:  # no new tokens
        out = q.new_zeros(v.shape)
    return out, (state if keep_state else None), starts
