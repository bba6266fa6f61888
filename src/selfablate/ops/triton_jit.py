"""Every Triton kernel of the package, in the one module that imports Triton: the wrappers
(`triton_lm_head`, `triton_attention`) import it on their first launch, so that importing the
package does not import Triton (a quarter of a second) where no kernel runs.
"""

import triton
import triton.language as tl

from .triton_base import LOG2E

BASE2: tl.constexpr = tl.constexpr(LOG2E)
"""log2(e) inside the kernels, which take their scores in base 2 (exp2 is the GPU's native exp)."""


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST (the interpreter, whose dot multiplies bfloat16's
    raw bits) multiplies float32 copies: bfloat16 products are exact in float32 either way."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)

# -- the LM head (`triton_lm_head`) ------------------------------------------------------------

@triton.jit
def rows_kernel(h_ptr, w_ptr, m_ptr, z_ptr, acc_ptr, n_rows, vocab, d_model, blocks_per_split,
                D: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """One block of rows over one split of the vocabulary: running max m, sum z of 2^(l - m),
    and acc = sum_v 2^(l_v - m) w_v, written at [split, row]."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dims = tl.arange(0, D)  # d_model padded to a power of two
    row_ok, dim_ok = rows < n_rows, dims < d_model
    h = tl.load(h_ptr + rows[:, None] * d_model + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)  # (BM, D)
    m = tl.full((BM,), float("-inf"), tl.float32)
    z = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    first = split * blocks_per_split
    for block in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(vocab, BV))):
        cols = block * BV + tl.arange(0, BV)
        col_ok = cols < vocab
        w = tl.load(w_ptr + cols[:, None] * d_model + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                    other=0.0)  # (BV, D)
        logits = dot(h, tl.trans(w), PRECISION, UPCAST) * BASE2  # (BM, BV), base 2
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        alpha = tl.exp2(m - m_new)  # rescales what came before (0 on the first block)
        p = tl.exp2(logits - m_new[:, None])
        z = z * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(w.dtype), w, PRECISION, UPCAST)
        m = m_new
    out = split * n_rows + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(z_ptr + out, z, mask=row_ok)
    tl.store(acc_ptr + out[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])

@triton.jit
def vocab_kernel(h_ptr, w_ptr, lse_ptr, s_ptr, gw_ptr, n_rows, vocab, d_model, D: tl.constexpr,
                 BM: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One block of the vocabulary over every row: grad_W_v = sum_i s_i 2^(l_iv - lse_i) h_i."""
    cols = tl.program_id(0) * BV + tl.arange(0, BV)
    dims = tl.arange(0, D)
    col_ok, dim_ok = cols < vocab, dims < d_model
    w = tl.load(w_ptr + cols[:, None] * d_model + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0)  # (BV, D)
    acc = tl.zeros((BV, D), tl.float32)
    for start in range(0, n_rows, BM):
        rows = start + tl.arange(0, BM)
        row_ok = rows < n_rows
        h = tl.load(h_ptr + rows[:, None] * d_model + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)  # (BM, D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)  # 0 past the last row: no contribution
        logits = dot(w, tl.trans(h), PRECISION, UPCAST) * BASE2  # (BV, BM)
        g = tl.exp2(logits - lse[None, :]) * s[None, :]
        acc += dot(g.to(h.dtype), h, PRECISION, UPCAST)
    tl.store(gw_ptr + cols[:, None] * d_model + dims[None, :], acc, mask=col_ok[:, None] & dim_ok[None, :])


# -- attention (`triton_attention`) -------------------------------------------------------------

@triton.jit
def _tile(ptr, rows, dims, n_rows, d_head, s_row):
    """A (rows, dims) tile of one (batch, head)'s (pos, d_head) matrix, zero past its edges."""
    mask = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
    return tl.load(ptr + rows[:, None] * s_row + dims[None, :], mask=mask, other=0.0)

@triton.jit
def _sees(rows, cols, n_rows, SELF: tl.constexpr):
    """Which keys each query sees: j < t with SELF (the clean keys), else j <= t. (Rows past the
    end see every key: their results are never stored, and no row is left without a key.)"""
    past = cols[None, :] < rows[:, None] if SELF else cols[None, :] <= rows[:, None]
    return past & (cols[None, :] < n_rows)

@triton.jit
def attention_forward(q_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, o_ptr, lse_ptr, n_heads, n_rows, d_head,
                      s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr, SELF: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(1)
    inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h  # this (batch, head)'s offset
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)  # (BLOCK, D)
    if SELF:  # the own key first: m = its base-2 score, l = 1, acc = its value
        own_k = _tile(ok_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
        m = tl.sum(q.to(tl.float32) * own_k, axis=1) * BASE2
        l = tl.full((BLOCK,), 1.0, tl.float32)
        acc = _tile(ov_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
    else:
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, D), tl.float32)
    for start in range(0, tl.minimum((tl.program_id(0) + 1) * BLOCK, n_rows), BLOCK):  # causal: no later block
        cols = start + tl.arange(0, BLOCK)
        k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)  # (BLOCK, D)
        v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * BASE2  # (queries, keys), base 2
        s = tl.where(_sees(rows, cols, n_rows, SELF), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new
    outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
    keep = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
    tl.store(o_ptr + outputs + rows[:, None] * o_t + dims[None, :], acc / l[:, None], mask=keep)
    tl.store(lse_ptr + bh * n_rows + rows, m + tl.log2(l), mask=rows < n_rows)

@triton.jit
def _probs(q, k, lse, rows, cols, n_rows, SELF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """p (queries, keys) of the forward pass, from its base-2 log-sum-exp."""
    s = dot(q, tl.trans(k), PRECISION, UPCAST) * BASE2
    return tl.where(_sees(rows, cols, n_rows, SELF), tl.exp2(s - lse[:, None]), 0.0)

@triton.jit
def attention_backward_kv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, n_heads, n_rows, d_head,
                          s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr, SELF: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(1)
    inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h
    outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)  # (BLOCK, D)
    v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
    dk = tl.zeros((BLOCK, D), tl.float32)
    dv = tl.zeros((BLOCK, D), tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n_rows, BLOCK):  # causal: no earlier query sees these keys
        rows = start + tl.arange(0, BLOCK)
        q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)
        do = _tile(do_ptr + outputs, rows, dims, n_rows, d_head, o_t)
        lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        delta = tl.load(delta_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
        p = _probs(q, k, lse, rows, cols, n_rows, SELF, PRECISION, UPCAST)  # (queries, keys)
        dv += dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST)
        ds = p * (dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])  # dL/d(score)
        dk += dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
    keep = (cols[:, None] < n_rows) & (dims[None, :] < d_head)
    at = outputs + cols[:, None] * o_t + dims[None, :]
    tl.store(dk_ptr + at, dk, mask=keep)
    tl.store(dv_ptr + at, dv, mask=keep)

@triton.jit
def attention_backward_q(q_ptr, k_ptr, v_ptr, ok_ptr, ov_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dok_ptr, dov_ptr,
                         n_heads, n_rows, d_head, s_b, s_h, s_t, o_b, o_h, o_t, D: tl.constexpr, BLOCK: tl.constexpr,
                         SELF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(1)
    inputs = (bh // n_heads) * s_b + (bh % n_heads) * s_h
    outputs = (bh // n_heads) * o_b + (bh % n_heads) * o_h
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, D)
    q = _tile(q_ptr + inputs, rows, dims, n_rows, d_head, s_t)
    do = _tile(do_ptr + outputs, rows, dims, n_rows, d_head, o_t)
    lse = tl.load(lse_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
    delta = tl.load(delta_ptr + bh * n_rows + rows, mask=rows < n_rows, other=0.0)
    dq = tl.zeros((BLOCK, D), tl.float32)
    for start in range(0, tl.minimum((tl.program_id(0) + 1) * BLOCK, n_rows), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        k = _tile(k_ptr + inputs, cols, dims, n_rows, d_head, s_t)
        v = _tile(v_ptr + inputs, cols, dims, n_rows, d_head, s_t)
        p = _probs(q, k, lse, rows, cols, n_rows, SELF, PRECISION, UPCAST)
        ds = p * (dot(do, tl.trans(v), PRECISION, UPCAST) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    at = outputs + rows[:, None] * o_t + dims[None, :]
    keep = (rows[:, None] < n_rows) & (dims[None, :] < d_head)
    if SELF:  # each row's own key and value: row-wise products, no GEMM
        own_k = _tile(ok_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
        own_v = _tile(ov_ptr + inputs, rows, dims, n_rows, d_head, s_t).to(tl.float32)
        qf, dof = q.to(tl.float32), do.to(tl.float32)
        p_own = tl.exp2(tl.sum(qf * own_k, axis=1) * BASE2 - lse)
        ds_own = p_own * (tl.sum(dof * own_v, axis=1) - delta)
        dq += ds_own[:, None] * own_k
        tl.store(dok_ptr + at, ds_own[:, None] * qf, mask=keep)
        tl.store(dov_ptr + at, p_own[:, None] * dof, mask=keep)
    tl.store(dq_ptr + at, dq, mask=keep)
