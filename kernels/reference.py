"""Pure-PyTorch references for every fused op: forward and backward, fp16/bf16/fp32/fp64.

These define the ops' semantics. Fused backends must match them; tests and benchmarks reuse them.
Math runs in fp32 (fp64 for fp64 inputs); results are cast back to the input dtype.
Each backward takes exactly what the matching forward saved, the same contract the fused
kernels implement, so a fused forward can be checked against a reference backward and vice versa.

Dropout masks come from Philox-4x32-10 keyed by (seed, counters), bit-identical to
`tl.philox` in Triton, so a kernel and its reference drop exactly the same elements.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57

# modality_rules entries
RULE_BLOCKED, RULE_FULL, RULE_CAUSAL = 0, 1, 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references (and the kernels' accumulators) compute in for `dtype` inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Counter-based RNG
# ----------------------------------------------------------------------------------------------

def _umul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a 32-bit constant and uint32 values held in int64."""
    # The int64 product wraps modulo 2**64 (two's complement), which keeps the full unsigned product's
    # low 64 bits; an arithmetic shift then masking recovers its high word exactly.
    product = b * a
    return (product >> 32) & MASK32, product & MASK32


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
           n_rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four 32-bit words of Philox-4x32 for a 64-bit `seed` and uint32 counters (int64 tensors), as `tl.philox`."""
    # Counters given as ints or CPU scalars join the device of the tensor counters (a GPU's, if any).
    devices = [c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)]
    device = next((d for d in devices if d.type != "cpu"), devices[0] if devices else None)
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _umul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Integer threshold on 31 random bits: an element is kept iff bits >= threshold (keep rate 1 - p).
    Capped at 2**31 - 1 so it fits the kernels' int32 comparison."""
    return min(int(round(p * 2**31)), 2**31 - 1)


def dropout_keep(seed: int, offset: int, index: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                 p: float) -> torch.Tensor:
    """Boolean keep-mask of the elements at `index` (the fastest-varying axis) with counters c1, c2.

    One Philox call serves four consecutive elements: counters (index // 4, c1, c2, offset), word index % 4,
    keep iff that word's top 31 bits >= dropout_threshold(p). The kernels use exactly this rule.
    """
    index = torch.as_tensor(index, dtype=torch.int64)
    words = philox(seed, index >> 2, c1, c2, torch.tensor(offset))
    which = (index & 3).expand(words[0].shape)
    bits = torch.stack(words).gather(0, which[None])[0]
    return (bits >> 1) >= dropout_threshold(p)


# Philox rounds of attention dropout: 7, as FlashAttention draws its dropout masks (the fewest rounds Salmon et al.,
# 2011, found Crush-resistant for Philox-4x32; their default of 10 adds a safety margin). Attention
# draws a mask byte for every score, so its rounds are a share of the kernel's ALU work; add + LayerNorm keeps 10.
ATTENTION_PHILOX_ROUNDS = 7


def dropout_byte_threshold(p: float) -> int:
    """Threshold on 8 random bits for attention dropout: keep iff byte >= threshold, so the dropout rate is p
    rounded to a multiple of 1/256 (as FlashAttention's 8-bit thresholds round it); at most 255."""
    return min(int(round(p * 256)), 255)


def attention_dropout_scale(p: float) -> float:
    """The keep scale of attention dropout: 1 / (1 - the rate actually drawn), i.e. 256 / (256 - threshold)."""
    return 256.0 / (256 - dropout_byte_threshold(p))


def dropout_keep_bytes(seed: int, offset: int, index: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                       p: float) -> torch.Tensor:
    """Boolean keep-mask with 16 decisions per Philox call (attention dropout), one per random byte: index j
    takes counters ((j // 64) * 4 + (j % 8) // 2, c1, c2, offset), word (j % 64) // 16 and byte
    2 * ((j // 8) % 2) + j % 2 of that word (lowest first), and is kept iff the byte >= dropout_byte_threshold(p).
    A call's 16 indices 8k + 2t + e (k < 8, e < 2) of a 64-index group are the ones a GPU thread holds of a score
    row in an MMA accumulator, so the kernels draw the mask where the scores are. Philox-4x32 runs
    ATTENTION_PHILOX_ROUNDS rounds. The attention kernels use exactly this rule."""
    index = torch.as_tensor(index, dtype=torch.int64)
    words = philox(seed, (index >> 6) * 4 + ((index >> 1) & 3), c1, c2, torch.tensor(offset),
                   n_rounds=ATTENTION_PHILOX_ROUNDS)
    which = ((index >> 4) & 3).expand(words[0].shape)
    word = torch.stack(words).gather(0, which[None])[0]
    byte = 2 * ((index >> 3) & 1) + (index & 1)
    return ((word >> (8 * byte)) & 255) >= dropout_byte_threshold(p)


# ----------------------------------------------------------------------------------------------
# Segment attention
# ----------------------------------------------------------------------------------------------

def attention_allowed(segment_ids: torch.Tensor, modality_ids: torch.Tensor | None,
                      modality_rules: torch.Tensor | None) -> torch.Tensor:
    """(B, L, L) bool: may query i attend key j (same non-negative segment, modality rule allows)."""
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = (seg_q == seg_k) & (seg_q >= 0)
    if modality_rules is not None:
        L = segment_ids.shape[1]
        mod = modality_ids.long()
        rule = modality_rules.long()[mod[:, :, None], mod[:, None, :]]
        pos = torch.arange(L, device=segment_ids.device)
        causal_ok = pos[:, None] >= pos[None, :]
        allowed &= (rule == RULE_FULL) | ((rule == RULE_CAUSAL) & causal_ok)
    return allowed


def attention_dropout_keep(seed: int, offset: int, B: int, H: int, L: int, p: float,
                           device: torch.device) -> torch.Tensor:
    """(B, H, L, L) keep-mask of attention dropout (`dropout_keep_bytes`): index = key j, counters (query i,
    b * H + h)."""
    j = torch.arange(L, device=device)
    bh = torch.arange(B * H, device=device).view(B, H, 1, 1)
    return dropout_keep_bytes(seed, offset, j.view(1, 1, 1, L), j.view(1, 1, L, 1), bh, p)


def segment_attention_fwd(q, k, v, segment_ids, modality_ids, modality_rules, dropout_p: float,
                          softmax_scale: float, seed: int, offset: int):
    """Returns (out (B, L, H, D) in q's dtype, lse (B, H, L) fp32/fp64; +inf on rows with no allowed key)."""
    ct = compute_dtype(q.dtype)
    B, L, H, _ = q.shape
    qf, kf, vf = (t.to(ct).transpose(1, 2) for t in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) * softmax_scale
    allowed = attention_allowed(segment_ids, modality_ids, modality_rules)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # +inf on empty rows makes exp(s - lse) exactly 0 there, with no special case downstream.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    probs = torch.exp(scores - lse[..., None])
    if dropout_p > 0:
        keep = attention_dropout_keep(seed, offset, B, H, L, dropout_p, q.device)
        probs = probs * keep * attention_dropout_scale(dropout_p)
    out = probs @ vf
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse


def segment_attention_bwd(dout, q, k, v, out, lse, segment_ids, modality_ids, modality_rules,
                          dropout_p: float, softmax_scale: float, seed: int, offset: int):
    """FlashAttention-style backward from the saved (out, lse): returns (dq, dk, dv) in q's dtype."""
    ct = compute_dtype(q.dtype)
    B, L, H, _ = q.shape
    qf, kf, vf, of, dof = (t.to(ct).transpose(1, 2) for t in (q, k, v, out, dout))
    scores = (qf @ kf.transpose(-1, -2)) * softmax_scale
    allowed = attention_allowed(segment_ids, modality_ids, modality_rules)[:, None]
    probs = torch.exp(scores.masked_fill(~allowed, float("-inf")) - lse.to(ct)[..., None])
    dprobs = dof @ vf.transpose(-1, -2)
    if dropout_p > 0:
        keep = attention_dropout_keep(seed, offset, B, H, L, dropout_p, q.device).to(ct) * attention_dropout_scale(
            dropout_p)
        dv = (probs * keep).transpose(-1, -2) @ dof
        dprobs = dprobs * keep
    else:
        dv = probs.transpose(-1, -2) @ dof
    delta = (dof * of).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta) * softmax_scale
    dq = dscores @ kf
    dk = dscores.transpose(-1, -2) @ qf
    return tuple(t.transpose(1, 2).to(q.dtype).contiguous() for t in (dq, dk, dv))


# ----------------------------------------------------------------------------------------------
# Residual add + dropout + LayerNorm
# ----------------------------------------------------------------------------------------------

def layer_norm_dropout_keep(seed: int, offset: int, rows: int, cols: int, p: float,
                            device: torch.device) -> torch.Tensor:
    """(rows, cols) keep-mask: index = column, counters (row low 32 bits, row high 32 bits)."""
    r = torch.arange(rows, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(cols, device=device, dtype=torch.int64)[None, :]
    return dropout_keep(seed, offset, c, r & MASK32, r >> 32, p)


def add_layer_norm_fwd(x, residual, weight, bias, eps: float, dropout_p: float, seed: int, offset: int):
    """Returns (out, s, mean, rstd): s = residual + dropout(x) in x's dtype, out = LN(s), fp32/fp64 stats."""
    ct = compute_dtype(x.dtype)
    N = x.shape[-1]
    xf = x.reshape(-1, N).to(ct, copy=True)  # s must never alias x
    if dropout_p > 0:
        keep = layer_norm_dropout_keep(seed, offset, xf.shape[0], N, dropout_p, x.device)
        xf = xf * keep / (1.0 - dropout_p)
    s = xf if residual is None else xf + residual.reshape(-1, N).to(ct)
    # Normalise the s that is returned and saved (rounded to x's dtype), so the backward, which
    # recomputes xhat from the saved s, is consistent with the forward.
    s = s.to(x.dtype).to(ct)
    mean = s.mean(-1)
    rstd = torch.rsqrt(((s - mean[:, None]) ** 2).mean(-1) + eps)
    out = (s - mean[:, None]) * rstd[:, None] * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(x.dtype).view(x.shape), s.to(x.dtype).view(x.shape), mean, rstd


def add_layer_norm_bwd(dout, ds_extra, s, mean, rstd, weight, has_residual: bool, has_bias: bool,
                       dropout_p: float, seed: int, offset: int):
    """Returns (dx, dresidual or None, dweight, dbias or None); ds_extra is the gradient reaching s directly."""
    ct = compute_dtype(s.dtype)
    N = s.shape[-1]
    sf, dof = s.reshape(-1, N).to(ct), dout.reshape(-1, N).to(ct)
    xhat = (sf - mean.to(ct)[:, None]) * rstd.to(ct)[:, None]
    g = dof * weight.to(ct)
    ds = rstd.to(ct)[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if ds_extra is not None:
        ds = ds + ds_extra.reshape(-1, N).to(ct)
    dx = ds
    if dropout_p > 0:
        keep = layer_norm_dropout_keep(seed, offset, ds.shape[0], N, dropout_p, s.device)
        dx = ds * keep / (1.0 - dropout_p)
    dweight = (dof * xhat).sum(0).to(weight.dtype)
    dbias = dof.sum(0).to(weight.dtype) if has_bias else None
    dresidual = ds.to(s.dtype, copy=True).view(s.shape) if has_residual else None  # never aliases dx
    return dx.to(s.dtype).view(s.shape), dresidual, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Softmax cross-entropy and linear cross-entropy
# ----------------------------------------------------------------------------------------------

def softmax_cross_entropy_fwd(logits, labels, ignore_index: int, label_smoothing: float):
    """Per-row (loss, lse, correct): fp32/fp64 loss and lse (0 on ignored rows), correct = target is a max."""
    z = logits.to(compute_dtype(logits.dtype))
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(z, dim=-1)
    z_target = z.gather(1, target[:, None])[:, 0]
    loss = lse - z_target
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(-1))
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    correct = valid & (z_target >= z.max(-1).values)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero), correct


def softmax_cross_entropy_bwd(dloss, dlse, logits, labels, lse, ignore_index: int, label_smoothing: float):
    """d(logits) in fp32/fp64 from per-row upstream gradients of loss and lse (dlse may be None)."""
    z = logits.to(compute_dtype(logits.dtype))
    V = z.shape[-1]
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()
    dloss = torch.where(valid, dloss.to(z.dtype), 0.0)
    scale = dloss if dlse is None else dloss + torch.where(valid, dlse.to(z.dtype), 0.0)
    probs = torch.exp(z - lse.to(z.dtype)[:, None])
    grad = probs * scale[:, None]
    grad = grad - (label_smoothing / V) * dloss[:, None]
    grad.scatter_add_(1, target[:, None], -(1.0 - label_smoothing) * dloss[:, None])
    return torch.where(valid[:, None], grad, 0.0)


def linear_logits(hidden, weight, bias):
    """hidden @ weight.T (+ bias) in the compute dtype: what the fused kernels never materialise."""
    ct = compute_dtype(hidden.dtype)
    logits = hidden.to(ct) @ weight.to(ct).T
    return logits if bias is None else logits + bias.to(ct)


def linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index: int, label_smoothing: float):
    """Per-row (loss, lse, correct) of softmax cross-entropy over hidden @ weight.T (+ bias)."""
    return softmax_cross_entropy_fwd(linear_logits(hidden, weight, bias), labels, ignore_index, label_smoothing)


def linear_cross_entropy_bwd(dloss, dlse, hidden, weight, labels, bias, lse, ignore_index: int,
                             label_smoothing: float):
    """Returns (dhidden, dweight, dbias or None) in the inputs' dtypes."""
    ct = compute_dtype(hidden.dtype)
    dlogits = softmax_cross_entropy_bwd(dloss, dlse, linear_logits(hidden, weight, bias), labels, lse,
                                        ignore_index, label_smoothing)
    dhidden = (dlogits @ weight.to(ct)).to(hidden.dtype)
    dweight = (dlogits.T @ hidden.to(ct)).to(weight.dtype)
    dbias = dlogits.sum(0).to(bias.dtype) if bias is not None else None
    return dhidden, dweight, dbias
