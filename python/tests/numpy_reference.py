"""A float64 NumPy reference of SPEC.md, written as plainly as possible for the Python tests.

Layouts are those of include/msa/ops.h. Every function loops over (query row, group or head) and
uses whole-vector NumPy arithmetic inside, which is fast enough for the tiny test shapes.
"""
import math

import numpy as np


def default_scales(cfg):
    # The library computes its scales in float32 (Config::softmax_scale): round the same way, so
    # that float64 runs agree to ~1e-15.
    def f32_inv_sqrt(n):
        return float(np.float32(1.0) / np.sqrt(np.float32(n)))
    scale = cfg.scale if cfg.scale != 0.0 else f32_inv_sqrt(cfg.head_dim)
    iscale = cfg.index_scale if cfg.index_scale != 0.0 else f32_inv_sqrt(cfg.index_head_dim)
    return scale, iscale


def query_rows(cu_q, cu_k):
    """For each packed query row: (absolute position p, first packed key row of its sequence)."""
    rows = []
    for b in range(len(cu_q) - 1):
        lq, lk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        rows += [(lk - lq + i, int(cu_k[b])) for i in range(lq)]
    return rows


def logsumexp(x):
    m = np.max(x)
    return m + math.log(np.sum(np.exp(x - m)))


def index_topk(cfg, cu_q, cu_k, qi, ki, temperature=1.0):
    """Returns (block_scores[g][row] as arrays, topk [Hkv, total_q, k] int32, selected_lse)."""
    _, iscale = default_scales(cfg)
    rows = query_rows(cu_q, cu_k)
    H, B, K = cfg.num_kv_heads, cfg.block_size, cfg.topk
    topk = np.full((H, len(rows), K), -1, np.int32)
    sel_lse = np.zeros((H, len(rows)))
    scores = [[None] * len(rows) for _ in range(H)]
    for g in range(H):
        for r, (p, kb) in enumerate(rows):
            s = iscale * (ki[kb:kb + p + 1].astype(np.float64) @ qi[r, g].astype(np.float64))
            local = p // B
            S = np.array([s[j * B:(j + 1) * B].max() for j in range(local + 1)])
            scores[g][r] = S
            order = sorted(range(local), key=lambda j: (-S[j], j))
            n = min(local, K - 1)
            topk[g, r, :n] = order[:n]
            topk[g, r, n] = local
            keys = visible_keys(cfg, p, topk[g, r])
            sel_lse[g, r] = logsumexp(s[keys] / temperature)
    return scores, topk, sel_lse


def visible_keys(cfg, p, topk_row):
    """Key offsets (within the sequence) a query at position p sees; topk_row None means dense."""
    if topk_row is None:
        return np.arange(p + 1)
    B = cfg.block_size
    blocks = sorted({int(j) for j in topk_row if j >= 0})
    return np.concatenate([np.arange(j * B, min((j + 1) * B, p + 1)) for j in blocks])


def _head_probs(cfg, q, k, r, h, p, kb, topk):
    scale, _ = default_scales(cfg)
    g = h // (cfg.num_q_heads // cfg.num_kv_heads)
    keys = kb + visible_keys(cfg, p, None if topk is None else topk[g, r])
    s = scale * (k[keys, g].astype(np.float64) @ q[r, h].astype(np.float64))
    lse = logsumexp(s)
    return keys, g, np.exp(s - lse), lse


def attention_forward(cfg, cu_q, cu_k, q, k, v, topk=None):
    rows = query_rows(cu_q, cu_k)
    out = np.zeros(q.shape)
    lse = np.zeros(q.shape[:2])
    for r, (p, kb) in enumerate(rows):
        for h in range(cfg.num_q_heads):
            keys, g, P, lse[r, h] = _head_probs(cfg, q, k, r, h, p, kb, topk)
            out[r, h] = P @ v[keys, g].astype(np.float64)
    return out, lse


def attention_backward(cfg, cu_q, cu_k, q, k, v, dout, topk=None):
    scale, _ = default_scales(cfg)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for r, (p, kb) in enumerate(query_rows(cu_q, cu_k)):
        for h in range(cfg.num_q_heads):
            keys, g, P, _ = _head_probs(cfg, q64, k64, r, h, p, kb, topk)
            o = P @ v64[keys, g]
            ds = P * (v64[keys, g] @ do64[r, h] - do64[r, h] @ o)
            dv[keys, g] += np.outer(P, do64[r, h])
            dq[r, h] += scale * ds @ k64[keys, g]
            dk[keys, g] += scale * np.outer(ds, q64[r, h])
    return dq, dk, dv


def kl_alignment(cfg, cu_q, cu_k, q, k, qi, ki, coeff, topk=None):
    """Returns (loss, dqi, dki): coeff * mean over (query, group) of KL(P || Q), and its gradients."""
    _, iscale = default_scales(cfg)
    rows = query_rows(cu_q, cu_k)
    H, G = cfg.num_kv_heads, cfg.num_q_heads // cfg.num_kv_heads
    qi64, ki64 = qi.astype(np.float64), ki.astype(np.float64)
    norm = coeff / (H * len(rows))
    dqi, dki = np.zeros(qi.shape), np.zeros(ki.shape)
    loss = 0.0
    for r, (p, kb) in enumerate(rows):
        for g in range(H):
            P = 0.0
            for h in range(g * G, (g + 1) * G):
                keys, _, Ph, _ = _head_probs(cfg, q, k, r, h, p, kb, topk)
                P = P + Ph / G
            s = iscale * (ki64[keys] @ qi64[r, g])
            logQ = s - logsumexp(s)
            pos = P > 0
            loss += np.sum(P[pos] * (np.log(P[pos]) - logQ[pos]))
            grad = norm * (np.exp(logQ) - P)
            dqi[r, g] += iscale * grad @ ki64[keys]
            dki[keys] += iscale * np.outer(grad, qi64[r, g])
    return loss * norm, dqi, dki
