"""The CPU backend through DLPack from NumPy, against the float64 reference in numpy_reference.py.

These tests need only numpy and pytest, so they always run (CI has no torch and no GPU).
"""
import numpy as np
import pytest

import msa
import numpy_reference as ref

# (queries, keys) per sequence: single tokens, partial/exact/overfull blocks, chunked-prefill and
# decode suffixes (queries < keys), lengths below k*B and above it.
LENGTHS = [(1, 1), (3, 3), (4, 4), (5, 5), (2, 13), (16, 16), (17, 17), (1, 30), (4, 29)]


def make_cfg(hq, hkv, block=4, topk=3, d=8, di=8):
    return msa.Config(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, index_head_dim=di,
                      block_size=block, topk=topk)


def cu_seqlens(lengths):
    cu_q = np.concatenate([[0], np.cumsum([lq for lq, _ in lengths])]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum([lk for _, lk in lengths])]).astype(np.int32)
    return cu_q, cu_k


def make_problem(cfg, dtype, seed, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    cu_q, cu_k = cu_seqlens(lengths)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    D, Di = cfg.head_dim, cfg.index_head_dim
    p = dict(
        cu_q=cu_q, cu_k=cu_k,
        q=rng.standard_normal((tq, cfg.num_q_heads, D)).astype(dtype),
        k=rng.standard_normal((tk, cfg.num_kv_heads, D)).astype(dtype),
        v=rng.standard_normal((tk, cfg.num_kv_heads, D)).astype(dtype),
        qi=rng.standard_normal((tq, cfg.num_kv_heads, Di)).astype(dtype),
        ki=rng.standard_normal((tk, Di)).astype(dtype),
        dout=rng.standard_normal((tq, cfg.num_q_heads, D)).astype(dtype),
    )
    return p


def poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, -7, dtype)


def rel_err(x, ref_x):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in output"
    return np.linalg.norm(x - ref_x) / max(np.linalg.norm(ref_x), 1e-300)


TOL = {np.float32: 1e-5, np.float64: 1e-12}
GQA = [(2, 2), (8, 2), (16, 1)]


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_index_topk(hq, hkv, dtype):
    cfg = make_cfg(hq, hkv)
    p = make_problem(cfg, dtype, seed=1)
    temperature = float(np.float32(0.7))  # the C++ API takes a float
    scores, _, sel_lse_ref = ref.index_topk(cfg, p["cu_q"], p["cu_k"], p["qi"], p["ki"], temperature)
    tq = p["q"].shape[0]
    topk = poisoned((hkv, tq, cfg.topk), np.int32)
    stats = np.float64 if dtype == np.float64 else np.float32
    sel_lse = poisoned((hkv, tq), stats)
    msa.index_topk(cfg, p["qi"], p["ki"], p["cu_q"], p["cu_k"], topk, selected_lse=sel_lse,
                   temperature=temperature)
    for g in range(hkv):
        for r in range(tq):
            S = scores[g][r]
            local = len(S) - 1
            n = min(local, cfg.topk - 1)
            row = topk[g, r]
            assert row[n] == local, (g, r, row)
            assert np.all(row[n + 1:] == -1), (g, r, row)
            chosen = row[:n]
            assert len(set(chosen.tolist())) == n and np.all((chosen >= 0) & (chosen < local))
            if n:  # each chosen block scores within tolerance of the n-th best candidate
                nth_best = np.sort(S[:local])[::-1][n - 1]
                assert np.all(S[chosen] >= nth_best - 1e-5), (g, r, row, S)
    assert rel_err(sel_lse, sel_lse_ref) < TOL[dtype]


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_attention_forward_backward(hq, hkv, dtype, mode):
    cfg = make_cfg(hq, hkv)
    p = make_problem(cfg, dtype, seed=2)
    _, topk, _ = ref.index_topk(cfg, p["cu_q"], p["cu_k"], p["qi"], p["ki"])
    sel = topk if mode == "sparse" else None
    out_ref, lse_ref = ref.attention_forward(cfg, p["cu_q"], p["cu_k"], p["q"], p["k"], p["v"], sel)
    dq_ref, dk_ref, dv_ref = ref.attention_backward(cfg, p["cu_q"], p["cu_k"], p["q"], p["k"],
                                                    p["v"], p["dout"], sel)
    stats = np.float64 if dtype == np.float64 else np.float32
    out, lse = poisoned(p["q"].shape, dtype), poisoned(p["q"].shape[:2], stats)
    dq, dk, dv = (poisoned(p[n].shape, dtype) for n in ("q", "k", "v"))
    if mode == "sparse":
        msa.sparse_attention_forward(cfg, p["q"], p["k"], p["v"], topk, p["cu_q"], p["cu_k"], out, lse)
        msa.sparse_attention_backward(cfg, p["q"], p["k"], p["v"], topk, out, lse, p["dout"],
                                      p["cu_q"], p["cu_k"], dq, dk, dv)
    else:
        msa.dense_attention_forward(cfg, p["q"], p["k"], p["v"], p["cu_q"], p["cu_k"], out, lse)
        msa.dense_attention_backward(cfg, p["q"], p["k"], p["v"], out, lse, p["dout"], p["cu_q"],
                                     p["cu_k"], dq, dk, dv)
    for name, x, r in [("out", out, out_ref), ("lse", lse, lse_ref), ("dq", dq, dq_ref),
                       ("dk", dk, dk_ref), ("dv", dv, dv_ref)]:
        assert rel_err(x, r) < TOL[dtype], name


@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_kl_alignment(hq, hkv, dtype, mode):
    cfg = make_cfg(hq, hkv)
    p = make_problem(cfg, dtype, seed=3)
    _, topk, _ = ref.index_topk(cfg, p["cu_q"], p["cu_k"], p["qi"], p["ki"])
    sel = topk if mode == "sparse" else None
    _, lse_ref = ref.attention_forward(cfg, p["cu_q"], p["cu_k"], p["q"], p["k"], p["v"], sel)
    loss_ref, dqi_ref, dki_ref = ref.kl_alignment(cfg, p["cu_q"], p["cu_k"], p["q"], p["k"],
                                                  p["qi"], p["ki"], 0.5, sel)
    stats = np.float64 if dtype == np.float64 else np.float32
    loss = poisoned((1,), stats)
    dqi, dki = poisoned(p["qi"].shape, dtype), poisoned(p["ki"].shape, dtype)
    msa.kl_alignment(cfg, p["q"], p["k"], lse_ref.astype(stats), p["qi"], p["ki"], sel, p["cu_q"],
                     p["cu_k"], 0.5, loss, dqi, dki)
    assert rel_err(loss, np.array([loss_ref])) < 10 * TOL[dtype]
    assert rel_err(dqi, dqi_ref) < TOL[dtype]
    assert rel_err(dki, dki_ref) < TOL[dtype]


def test_strided_views_are_accepted():
    """q, k, v as slices of one packed buffer (outer strides free, innermost contiguous)."""
    cfg = make_cfg(4, 2)
    p = make_problem(cfg, np.float32, seed=4)
    tk = p["k"].shape[0]
    kv = np.empty((tk, 2, 2, 8), np.float32)
    kv[:, 0], kv[:, 1] = p["k"], p["v"]
    k_view, v_view = kv[:, 0], kv[:, 1]
    out, lse = poisoned(p["q"].shape, np.float32), poisoned(p["q"].shape[:2], np.float32)
    msa.dense_attention_forward(cfg, p["q"], k_view, v_view, p["cu_q"], p["cu_k"], out, lse)
    out_ref, _ = ref.attention_forward(cfg, p["cu_q"], p["cu_k"], p["q"], p["k"], p["v"])
    assert rel_err(out, out_ref) < 1e-5


def test_workspace_bytes_and_explicit_workspace():
    cfg = make_cfg(4, 2)
    p = make_problem(cfg, np.float32, seed=5)
    tq, tk = p["q"].shape[0], p["k"].shape[0]
    n = msa.workspace_bytes("index_topk", cfg, p["cu_q"], p["cu_k"], tq, tk, num_threads=1)
    assert n >= 0
    topk = poisoned((2, tq, cfg.topk), np.int32)
    ws = np.zeros(max(n, 1), np.uint8)
    msa.index_topk(cfg, p["qi"], p["ki"], p["cu_q"], p["cu_k"], topk, workspace=ws, num_threads=1)
    _, topk_ref, _ = ref.index_topk(cfg, p["cu_q"], p["cu_k"], p["qi"], p["ki"])
    assert np.all(topk[:, :, -1] == topk_ref[:, :, -1]) or np.all(np.sort(topk, -1) == np.sort(topk_ref, -1))


# ---- bad input --------------------------------------------------------------------------------

def _topk_call(cfg, p, **over):
    args = dict(qi=p["qi"], ki=p["ki"], cu_q=p["cu_q"], cu_k=p["cu_k"],
                topk=np.zeros((cfg.num_kv_heads, p["q"].shape[0], cfg.topk), np.int32))
    args.update(over)
    msa.index_topk(cfg, args["qi"], args["ki"], args["cu_q"], args["cu_k"], args["topk"])


@pytest.mark.parametrize("case,argument", [
    ("qi_shape", "qi"),
    ("ki_dtype", "ki"),
    ("cu_int64", "cu_seqlens_q"),
    ("cu_not_suffix", "cu_seqlens_k"),
    ("topk_shape", "topk"),
    ("qi_inner_stride", "qi"),
    ("qi_five_dims", "qi"),
])
def test_bad_input_raises_argument_error(case, argument):
    cfg = make_cfg(4, 2)
    p = make_problem(cfg, np.float32, seed=6)
    over = {
        "qi_shape": dict(qi=p["qi"][:, :1]),
        "ki_dtype": dict(ki=p["ki"].astype(np.float64)),
        "cu_int64": dict(cu_q=p["cu_q"].astype(np.int64)),
        # Same totals, but sequence 0 has more queries (5) than keys (3).
        "cu_not_suffix": dict(cu_q=np.array([0, 5, p["q"].shape[0]], np.int32),
                              cu_k=np.array([0, 3, p["k"].shape[0]], np.int32)),
        "topk_shape": dict(topk=np.zeros((2, 1, cfg.topk), np.int32)),
        "qi_inner_stride": dict(qi=np.repeat(p["qi"], 2, axis=2)[:, :, ::2]),
        "qi_five_dims": dict(qi=p["qi"][None, None]),
    }[case]
    with pytest.raises(msa.ArgumentError) as info:
        _topk_call(cfg, p, **over)
    assert info.value.argument == argument, str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, msa.Error)


def test_bad_config_and_op_name():
    p = make_problem(make_cfg(4, 2), np.float32, seed=7)
    with pytest.raises(msa.ArgumentError) as info:
        _topk_call(make_cfg(3, 2), p)
    assert info.value.argument == "num_q_heads"
    with pytest.raises(msa.ArgumentError) as info:
        msa.workspace_bytes("nope", make_cfg(4, 2), p["cu_q"], p["cu_k"], 1, 1)
    assert info.value.argument == "op"


def test_error_classes():
    assert issubclass(msa.ArgumentError, ValueError) and issubclass(msa.ArgumentError, msa.Error)
    assert issubclass(msa.NotSupportedError, NotImplementedError)
    assert issubclass(msa.Error, RuntimeError)
    cfg = msa.Config()
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.block_size, cfg.topk) == (64, 4, 128, 128, 16)
    assert abs(cfg.softmax_scale() - 128 ** -0.5) < 1e-7
