"""The serving API through Python (msa.paged) on the CPU, with NumPy arrays: append + run over a
shuffled paged cache equal the contiguous ops (msa.index_topk selections checked against the float64
reference scores, msa.sparse_attention_forward / dense_attention_forward outputs), and FP8 caches
passed as uint8 bytes with their scales equal the dense op on the dequantised values."""
import numpy as np
import pytest

import msa
import msa.paged
import numpy_reference as ref

# (q_len, kv_len): decode tokens, a chunk over a prefix, a fresh prompt, a request of one token.
LENGTHS = [(1, 1), (3, 17), (16, 40), (5, 5), (1, 33), (12, 61)]


def make_cfg(hq, hkv):
    return msa.Config(num_q_heads=hq, num_kv_heads=hkv, head_dim=16, index_head_dim=8, block_size=4,
                      topk=3)


class Step:
    def __init__(self, cfg, seed, lengths=LENGTHS):
        rng = np.random.default_rng(seed)
        B, hkv, D, Di = cfg.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.index_head_dim
        self.q_lens = np.array([q for q, _ in lengths], np.int32)
        self.kv_lens = np.array([k for _, k in lengths], np.int32)
        self.cu_q = np.concatenate([[0], np.cumsum(self.q_lens)]).astype(np.int32)
        self.cu_k = np.concatenate([[0], np.cumsum(self.kv_lens)]).astype(np.int32)
        tq, tk = int(self.cu_q[-1]), int(self.cu_k[-1])
        f = np.float32
        self.q = rng.standard_normal((tq, cfg.num_q_heads, D)).astype(f)
        self.qi = rng.standard_normal((tq, hkv, Di)).astype(f)
        self.k = rng.standard_normal((tk, hkv, D)).astype(f)
        self.v = rng.standard_normal((tk, hkv, D)).astype(f)
        self.ki = rng.standard_normal((tk, Di)).astype(f)
        nblk = [(k + B - 1) // B for k in self.kv_lens]
        self.num_pages = sum(nblk) + 2
        perm = rng.permutation(self.num_pages).astype(np.int32)
        self.page_table = np.full((len(lengths), max(nblk) + 1), -1, np.int32)
        at = 0
        for r, n in enumerate(nblk):
            self.page_table[r, :n] = perm[at:at + n]
            at += n
        # The new tokens are the last q_len of each request, packed like q.
        rows = np.concatenate([np.arange(self.cu_k[r + 1] - self.q_lens[r], self.cu_k[r + 1])
                               for r in range(len(lengths))]).astype(np.int64)
        self.k_new, self.v_new, self.ki_new = self.k[rows], self.v[rows], self.ki[rows]

    def empty_cache(self, cfg, dtype=np.float32, head_major=False):
        """k, v [num_pages, B, Hkv, D], ki. head_major: views of [num_pages, Hkv, B, D] storage;
        "kv_pairs": of one [num_pages, 2, Hkv, B, D] buffer (FlashInfer's HND kv_cache tensor)."""
        B, hkv, D, Di = cfg.block_size, cfg.num_kv_heads, cfg.head_dim, cfg.index_head_dim
        fill = 0 if dtype == np.uint8 else np.nan
        if head_major == "kv_pairs":
            both = np.full((self.num_pages, 2, hkv, B, D), fill, dtype)
            k, v = msa.paged.head_major(both[:, 0]), msa.paged.head_major(both[:, 1])
        elif head_major:
            k, v = (msa.paged.head_major(np.full((self.num_pages, hkv, B, D), fill, dtype)) for _ in range(2))
            assert not k.flags.c_contiguous and k.shape == (self.num_pages, B, hkv, D)
        else:
            k, v = (np.full((self.num_pages, B, hkv, D), fill, dtype) for _ in range(2))
        return k, v, np.full((self.num_pages, B, Di), fill, dtype)

    def prefix_cache(self, cfg, head_major=False):
        """empty_cache holding the tokens that precede the step (what earlier steps appended)."""
        k, v, ki = self.empty_cache(cfg, head_major=head_major)
        for page, slot, tok in self.prefix_slots(cfg):
            k[page, slot], v[page, slot], ki[page, slot] = self.k[tok], self.v[tok], self.ki[tok]
        return k, v, ki

    def prefix_slots(self, cfg):
        """(page, slot, token) of every cached token that precedes the step."""
        B = cfg.block_size
        for r in range(len(self.q_lens)):
            for t in range(self.kv_lens[r] - self.q_lens[r]):
                yield self.page_table[r, t // B], t % B, self.cu_k[r] + t

    def new_slots(self, cfg):
        """(page, slot, token) of every token this step appends."""
        B = cfg.block_size
        for r in range(len(self.q_lens)):
            for t in range(self.kv_lens[r] - self.q_lens[r], self.kv_lens[r]):
                yield self.page_table[r, t // B], t % B, self.cu_k[r] + t

    def batch(self):
        return msa.paged.Batch(self.cu_q, self.kv_lens, self.page_table)


def run(cfg, s, cache, dense=False):
    p = msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="float32", dense=dense)
    assert p.total_q == s.q.shape[0] and p.workspace_bytes > 0
    ws = np.zeros(p.workspace_bytes, np.uint8)
    msa.paged.append(p, s.batch(), s.k_new, s.v_new, s.ki_new, cache)
    out = np.full(s.q.shape, np.nan, np.float32)
    lse = np.full(s.q.shape[:2], np.nan, np.float32)
    topk = None if dense else np.full((cfg.num_kv_heads, s.q.shape[0], cfg.topk), -7, np.int32)
    msa.paged.run(p, s.batch(), s.q, None if dense else s.qi, cache, out, lse, topk, ws)
    return out, lse, topk


def rel_err(x, r):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in output"
    return np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-300)


@pytest.mark.parametrize("hq,hkv,head_major", [(2, 2, False), (8, 2, False), (16, 1, False), (8, 2, True),
                                               (8, 2, "kv_pairs")])
def test_sparse_step_matches_contiguous_ops(hq, hkv, head_major):
    cfg = make_cfg(hq, hkv)
    s = Step(cfg, seed=hq + hkv)
    k_c, v_c, ki_c = s.prefix_cache(cfg, head_major=head_major)
    out, lse, topk = run(cfg, s, msa.paged.Cache(k_c, v_c, ki_c))
    for page, slot, tok in s.new_slots(cfg):  # the append wrote through the strides
        assert np.array_equal(k_c[page, slot], s.k[tok]) and np.array_equal(v_c[page, slot], s.v[tok])
    # Selections: layout of rules.h, each chosen block within rounding of the n-th best score.
    scores, _, _ = ref.index_topk(cfg, s.cu_q, s.cu_k, s.qi.astype(np.float64), s.ki.astype(np.float64))
    for g in range(hkv):
        for r in range(s.q.shape[0]):
            S = scores[g][r]
            local = len(S) - 1
            n = min(local, cfg.topk - 1)
            row = topk[g, r]
            assert row[n] == local and np.all(row[n + 1:] == -1), (g, r, row)
            chosen = row[:n]
            assert len(set(chosen.tolist())) == n and np.all((chosen >= 0) & (chosen < local))
            if n:
                assert np.all(S[chosen] >= np.sort(S[:local])[::-1][n - 1] - 1e-5), (g, r, row, S)
    want_out = np.full_like(out, np.nan)
    want_lse = np.full_like(lse, np.nan)
    msa.sparse_attention_forward(cfg, s.q, s.k, s.v, topk, s.cu_q, s.cu_k, want_out, want_lse)
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5


def test_dense_step_matches_dense_forward():
    cfg = make_cfg(8, 2)
    s = Step(cfg, seed=7)
    k_c, v_c, ki_c = s.prefix_cache(cfg)
    out, lse, _ = run(cfg, s, msa.paged.Cache(k_c, v_c, ki_c), dense=True)
    want_out, want_lse = np.full_like(out, np.nan), np.full_like(lse, np.nan)
    msa.dense_attention_forward(cfg, s.q, s.k, s.v, s.cu_q, s.cu_k, want_out, want_lse)
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5


def e4m3_table():
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, mant = (b >> 3) & 15, b & 7
    mag = np.where(exp == 0, mant / 8.0 * 2.0 ** -6, (1 + mant / 8.0) * 2.0 ** (exp - 7.0))
    t = sign * mag
    t[(b & 0x7f) == 0x7f] = np.nan
    return t


def test_fp8_cache_as_uint8_bytes():
    cfg = make_cfg(8, 2)
    s = Step(cfg, seed=9)
    hkv = cfg.num_kv_heads
    k_c, v_c, ki_c = s.empty_cache(cfg, np.uint8)
    ks = np.full((s.num_pages, hkv), 5.0 / 448, np.float32)  # range +-5: standard normals fit
    vs = np.full((s.num_pages, hkv), 5.0 / 448, np.float32)
    kis = np.full((s.num_pages,), 5.0 / 448, np.float32)
    table = e4m3_table()
    enc = {v: i for i, v in enumerate(table) if np.isfinite(v)}
    codes = np.array(sorted(enc)), np.array([enc[v] for v in sorted(enc)], np.uint8)

    def quant(x, scale):  # nearest code (the append's rule, ties aside), enough for the prefix here
        y = np.clip(x / scale, -448, 448)
        i = np.abs(codes[0][None, :] - y.reshape(-1, 1)).argmin(axis=1)
        return codes[1][i].reshape(x.shape)
    for page, slot, tok in s.prefix_slots(cfg):
        k_c[page, slot] = quant(s.k[tok], ks[page][:, None])
        v_c[page, slot] = quant(s.v[tok], vs[page][:, None])
        ki_c[page, slot] = quant(s.ki[tok], kis[page])
    cache = msa.paged.Cache(k_c, v_c, ki_c, ks, vs, kis)
    out, lse, _ = run(cfg, s, cache, dense=True)
    # The dense op over the dequantised cache, gathered back into contiguous order.
    B = cfg.block_size
    k_d = np.empty_like(s.k)
    v_d = np.empty_like(s.v)
    for r in range(len(s.q_lens)):
        for t in range(s.kv_lens[r]):
            page, slot = s.page_table[r, t // B], t % B
            k_d[s.cu_k[r] + t] = table[k_c[page, slot]] * ks[page][:, None]
            v_d[s.cu_k[r] + t] = table[v_c[page, slot]] * vs[page][:, None]
    assert np.abs(k_d - s.k).max() < 0.2  # E4M3 steps are <= 1/16 of the value: quantised, not garbage
    want_out, want_lse = np.full_like(out, np.nan), np.full_like(lse, np.nan)
    msa.dense_attention_forward(cfg, s.q, k_d, v_d, s.cu_q, s.cu_k, want_out, want_lse)
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5


def test_fp8_cache_as_torch_float8():
    """torch float8_e4m3fn caches go in as they are (msa.paged._dl passes their bytes): the same
    result as the same codes as uint8 bytes, and not the result of other codes."""
    torch = pytest.importorskip("torch")
    cfg = make_cfg(8, 2)
    results = []
    for as_float8 in (False, True):
        s = Step(cfg, seed=19)
        hkv = cfg.num_kv_heads
        k_c, v_c, ki_c = s.empty_cache(cfg, np.uint8)
        scale = np.float32(5.0 / 448)
        for page, slot, tok in s.prefix_slots(cfg):  # codes straight from torch's own E4M3 rounding
            for dst, src in ((k_c, s.k), (v_c, s.v), (ki_c, s.ki)):
                dst[page, slot] = torch.from_numpy(src[tok] / scale).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        t = (lambda x: torch.from_numpy(x).view(torch.float8_e4m3fn)) if as_float8 else torch.from_numpy
        ks = np.full((s.num_pages, hkv), scale, np.float32)
        kis = np.full((s.num_pages,), scale, np.float32)
        cache = msa.paged.Cache(t(k_c), t(v_c), t(ki_c), ks, ks.copy(), kis)
        results.append(run(cfg, s, cache))
    (o_u8, l_u8, t_u8), (o_f8, l_f8, t_f8) = results
    assert np.all(np.isfinite(o_f8))
    np.testing.assert_array_equal(o_f8, o_u8)
    np.testing.assert_array_equal(l_f8, l_u8)
    np.testing.assert_array_equal(t_f8, t_u8)


def test_bad_arguments_name_themselves():
    cfg = make_cfg(8, 2)
    with pytest.raises(msa.ArgumentError) as e:
        msa.paged.plan(cfg, [2], [1])
    assert e.value.argument == "q_lens"
    with pytest.raises(msa.ArgumentError) as e:
        msa.paged.plan(cfg, [1], [4], device="tpu")
    assert e.value.argument == "device"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_check_batch_names_the_bad_tensor(device):
    """msa.paged.check_batch: a batch that matches its plan passes; a page id outside the cache, a
    kv_len or a cu_seqlens_q entry unlike the plan's raise ArgumentError naming the tensor. On the
    GPU it reads the device tensors back (torch; skipped without a GPU or a CUDA build)."""
    cfg = make_cfg(8, 2)
    s = Step(cfg, seed=9)
    t = lambda x: x
    if device == "cuda":
        torch = pytest.importorskip("torch")
        if not (torch.cuda.is_available() and msa.cuda_available()):
            pytest.skip("no CUDA device or no CUDA build")
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to("cuda")
    k_c, v_c, ki_c = s.empty_cache(cfg)
    cache = msa.paged.Cache(t(k_c), t(v_c), t(ki_c))
    p = msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="float32", device=device)
    msa.paged.check_batch(p, msa.paged.Batch(t(s.cu_q), t(s.kv_lens), t(s.page_table)), cache)
    bad_table = s.page_table.copy()
    bad_table[3, 1] = s.num_pages
    bad_kv = s.kv_lens.copy()
    bad_kv[2] += 1
    bad_cu = s.cu_q.copy()
    bad_cu[-1] += 1
    for name, batch in [("page_table", (s.cu_q, s.kv_lens, bad_table)), ("kv_lens", (s.cu_q, bad_kv, s.page_table)),
                        ("cu_seqlens_q", (bad_cu, s.kv_lens, s.page_table))]:
        with pytest.raises(msa.ArgumentError) as e:
            msa.paged.check_batch(p, msa.paged.Batch(*(t(x) for x in batch)), cache)
        assert e.value.argument == name


@pytest.mark.parametrize("head_major", [False, True])
def test_cuda_step_matches_cpu_step(head_major):
    """The CUDA backend through torch tensors (skipped without torch, a GPU or a CUDA build), with
    token-major and head-major K / V pages."""
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and msa.cuda_available()):
        pytest.skip("no CUDA device or no CUDA build")
    cfg = msa.Config(num_q_heads=8, num_kv_heads=2, head_dim=64, index_head_dim=32, block_size=16,
                     topk=4)
    lengths = [(1, 1), (3, 40), (16, 100), (1, 300), (9, 77)]
    results = []
    for device in ("cpu", "cuda"):
        s = Step(cfg, seed=11, lengths=lengths)
        k_c, v_c, ki_c = s.prefix_cache(cfg)
        p = msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="float32", device=device)
        t = (lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device))
        kv = (lambda x: msa.paged.head_major(t(x.swapaxes(1, 2)))) if head_major else t
        cache = msa.paged.Cache(kv(k_c), kv(v_c), t(ki_c))
        assert cache.k.is_contiguous() != head_major
        batch = msa.paged.Batch(t(s.cu_q), t(s.kv_lens), t(s.page_table))
        ws = torch.zeros(p.workspace_bytes, dtype=torch.uint8, device=device)
        out = torch.full(s.q.shape, float("nan"), device=device)
        lse = torch.full(s.q.shape[:2], float("nan"), device=device)
        topk = torch.full((cfg.num_kv_heads, s.q.shape[0], cfg.topk), -7, dtype=torch.int32, device=device)
        msa.paged.append(p, batch, t(s.k_new), t(s.v_new), t(s.ki_new), cache)
        msa.paged.run(p, batch, t(s.q), t(s.qi), cache, out, lse, topk, ws)
        if device == "cuda":
            torch.cuda.synchronize()
        results.append((out.cpu().numpy(), lse.cpu().numpy(), topk.cpu().numpy(), cache.k.cpu().numpy()))
    (o_c, l_c, t_c, k_cpu), (o_g, l_g, t_g, k_gpu) = results
    np.testing.assert_array_equal(np.nan_to_num(k_gpu, nan=1e30), np.nan_to_num(k_cpu, nan=1e30))
    assert np.array_equal(np.sort(t_g, axis=-1), np.sort(t_c, axis=-1)), "selections differ"
    assert rel_err(o_g, o_c) < 1e-5
    assert rel_err(l_g, l_c) < 1e-5


@pytest.mark.parametrize("head_major", [False, True])
def test_torch_tensors_equal_numpy_arrays(head_major):
    """torch tensors go to the binding as DLPack capsules (msa.paged._dl): the CPU step through
    torch equals the one through NumPy, head-major views included."""
    torch = pytest.importorskip("torch")
    cfg = make_cfg(8, 2)
    results = []
    for use_torch in (False, True):
        s = Step(cfg, seed=5)
        k_c, v_c, ki_c = s.prefix_cache(cfg, head_major=head_major)
        p = msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="float32")
        t = (lambda x: torch.from_numpy(x)) if use_torch else (lambda x: x)
        cache = msa.paged.Cache(t(k_c), t(v_c), t(ki_c))
        batch = msa.paged.Batch(t(s.cu_q), t(s.kv_lens), t(s.page_table))
        out = np.full(s.q.shape, np.nan, np.float32)
        lse = np.full(s.q.shape[:2], np.nan, np.float32)
        topk = np.full((cfg.num_kv_heads, s.q.shape[0], cfg.topk), -7, np.int32)
        ws = np.zeros(p.workspace_bytes, np.uint8)
        msa.paged.append(p, batch, t(s.k_new), t(s.v_new), t(s.ki_new), cache)
        msa.paged.run(p, batch, t(s.q), t(s.qi), cache, t(out), t(lse), t(topk), t(ws))
        assert np.all(np.isfinite(out)), "the outputs were not written through the torch views"
        results.append((out, lse, topk, np.array(k_c)))
    (o_n, l_n, t_n, k_n), (o_t, l_t, t_t, k_t) = results
    np.testing.assert_array_equal(o_t, o_n)
    np.testing.assert_array_equal(l_t, l_n)
    np.testing.assert_array_equal(t_t, t_n)
    np.testing.assert_array_equal(np.nan_to_num(k_t, nan=1e30), np.nan_to_num(k_n, nan=1e30))


def test_cuda_run_captured_by_torch_cuda_graph():
    """msa.paged.run inside torch.cuda.graph (a side stream, torch's current stream by default):
    the replay writes what an eager run writes (skipped without a GPU or a CUDA build)."""
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and msa.cuda_available()):
        pytest.skip("no CUDA device or no CUDA build")
    cfg = msa.Config(num_q_heads=16, num_kv_heads=2, head_dim=128, index_head_dim=64, block_size=16,
                     topk=4)
    s = Step(cfg, seed=13, lengths=[(1, 300), (4, 77), (1, 16), (16, 400)])
    k_c, v_c, ki_c = s.prefix_cache(cfg, head_major=True)
    dev, bf = "cuda", torch.bfloat16
    t = (lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev))
    kv = (lambda x: msa.paged.head_major(t(np.nan_to_num(x).swapaxes(1, 2)).to(bf)))
    cache = msa.paged.Cache(kv(k_c), kv(v_c), t(np.nan_to_num(ki_c)).to(bf))
    batch = msa.paged.Batch(t(s.cu_q), t(s.kv_lens), t(s.page_table))
    p = msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="bfloat16", device="cuda")
    ws = torch.zeros(p.workspace_bytes, dtype=torch.uint8, device=dev)
    q, qi = t(s.q).to(bf), t(s.qi).to(bf)
    msa.paged.append(p, batch, t(s.k_new).to(bf), t(s.v_new).to(bf), t(s.ki_new).to(bf), cache)

    def outputs():
        return (torch.full(q.shape, float("nan"), dtype=bf, device=dev),
                torch.full(q.shape[:2], float("nan"), device=dev),
                torch.full((cfg.num_kv_heads, q.shape[0], cfg.topk), -7, dtype=torch.int32, device=dev))
    eager = outputs()
    msa.paged.run(p, batch, q, qi, cache, *eager, ws)
    captured = outputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capturing stream, as torch's docs ask
        msa.paged.run(p, batch, q, qi, cache, *captured, ws)
    torch.cuda.current_stream().wait_stream(side)
    for x in captured:
        x.fill_(-7)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        msa.paged.run(p, batch, q, qi, cache, *captured, ws)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
