"""msa.torch: custom ops, autograd, the MSA layer against a pure-PyTorch reference, KL detach,
torch.compile, and (with a GPU) the CUDA ops against the CPU ops. Skipped without torch (CI)."""
import math

import pytest

torch = pytest.importorskip("torch")

import msa  # noqa: E402
import msa.torch as mt  # noqa: E402

LENGTHS = [(1, 1), (3, 3), (5, 5), (2, 13), (16, 16), (17, 17), (4, 29)]
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and msa.cuda_available()),
                                reason="needs a GPU and a CUDA build of msa")


def make_cfg(hq=4, hkv=2, d=8, di=8, block=4, topk=3, scale=0.0):
    return msa.Config(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, index_head_dim=di,
                      block_size=block, topk=topk, scale=scale)


def cu(lengths, which, device="cpu"):
    vals = [0]
    for lq, lk in lengths:
        vals.append(vals[-1] + (lq if which == "q" else lk))
    return torch.tensor(vals, dtype=torch.int32, device=device)


def tensors(cfg, lengths, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(l for l, _ in lengths), sum(l for _, l in lengths)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return dict(q=r(tq, cfg.num_q_heads, cfg.head_dim), k=r(tk, cfg.num_kv_heads, cfg.head_dim),
                v=r(tk, cfg.num_kv_heads, cfg.head_dim),
                qi=r(tq, cfg.num_kv_heads, cfg.index_head_dim), ki=r(tk, cfg.index_head_dim),
                cu_q=cu(lengths, "q", device), cu_k=cu(lengths, "k", device))


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---- a pure-PyTorch reference of MSA (dense masked attention with the same block selection) ----

def f32_inv_sqrt(n):
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(n)).sqrt())


def reference_mask(cfg, cu_q, cu_k, qi, ki, mode):
    """Boolean [Hkv, total_q, total_k]: which keys each (group, query) sees."""
    H, B, K = cfg.num_kv_heads, cfg.block_size, cfg.topk
    tq, tk = qi.shape[0], ki.shape[0]
    mask = torch.zeros(H, tq, tk, dtype=torch.bool)
    iscale = f32_inv_sqrt(cfg.index_head_dim)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = q1 - q0, k1 - k0
        for i in range(lq):
            p = lk - lq + i
            if mode != "sparse":
                mask[:, q0 + i, k0:k0 + p + 1] = True
                continue
            local = p // B
            for g in range(H):
                s = iscale * (ki[k0:k0 + p + 1].double() @ qi[q0 + i, g].double())
                S = torch.stack([s[j * B:(j + 1) * B].max() for j in range(local + 1)])
                order = sorted(range(local), key=lambda j: (-S[j].item(), j))
                for j in order[:min(local, K - 1)] + [local]:
                    mask[g, q0 + i, k0 + j * B:k0 + min((j + 1) * B, p + 1)] = True
    return mask


def reference_attention(cfg, q, k, v, mask):
    G = cfg.num_q_heads // cfg.num_kv_heads
    scale = f32_inv_sqrt(cfg.head_dim)
    kk = k.repeat_interleave(G, dim=1)  # [tk, Hq, D]
    vv = v.repeat_interleave(G, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~mask.repeat_interleave(G, dim=0), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv), s


def reference_kl(cfg, scores, qi, ki, mask, coeff):
    """Teacher P detached (group mean of the main-branch probabilities), student log-softmax."""
    H, G = cfg.num_kv_heads, cfg.num_q_heads // cfg.num_kv_heads
    P = torch.softmax(scores.detach(), -1).view(H, G, *scores.shape[1:]).mean(1)  # [H, tq, tk]
    s = torch.einsum("qgd,kd->gqk", qi, ki) * f32_inv_sqrt(cfg.index_head_dim)
    logQ = torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1)
    kl = torch.where(P > 0, P * (torch.log(P.clamp_min(1e-300)) - logQ), torch.zeros_like(P))
    return coeff * kl.sum() / (H * qi.shape[0])


# ---- ops ---------------------------------------------------------------------------------------

def test_index_topk_without_lse_selects_the_same_blocks():
    cfg = make_cfg()
    t = tensors(cfg, LENGTHS, torch.float32, seed=3)
    topk, lse = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)
    topk_only, none = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg, with_lse=False)
    assert none is None and lse.shape == (cfg.num_kv_heads, t["qi"].shape[0])
    assert torch.equal(topk, topk_only)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_gradcheck_attention(mode):
    cfg = make_cfg()
    lengths = [(3, 3), (2, 11), (9, 9)]
    t = tensors(cfg, lengths, torch.float64, seed=1)
    c, s = mt.config_args(cfg)
    topk, _ = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)

    def f(q, k, v):
        if mode == "sparse":
            return torch.ops.msa.sparse_attention_fwd(q, k, v, topk, t["cu_q"], t["cu_k"], c, s, 0, 0)[0]
        return torch.ops.msa.dense_attention_fwd(q, k, v, t["cu_q"], t["cu_k"], c, s, 0, 0)[0]

    args = [t[n].clone().requires_grad_() for n in ("q", "k", "v")]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_gradcheck_kl(mode):
    cfg = make_cfg()
    lengths = [(3, 3), (2, 11), (9, 9)]
    t = tensors(cfg, lengths, torch.float64, seed=2)
    topk = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)[0] if mode == "sparse" else None
    c, s = mt.config_args(cfg)
    fwd = torch.ops.msa.sparse_attention_fwd if topk is not None else None
    if topk is not None:
        _, lse = fwd(t["q"], t["k"], t["v"], topk, t["cu_q"], t["cu_k"], c, s, 0, 0)
    else:
        _, lse = torch.ops.msa.dense_attention_fwd(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], c, s, 0, 0)

    def f(qi, ki):
        return mt.kl_alignment_loss(t["q"], t["k"], lse, qi, ki, topk, t["cu_q"], t["cu_k"], cfg, 0.7)

    args = [t["qi"].clone().requires_grad_(), t["ki"].clone().requires_grad_()]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_kl_gives_no_gradient_to_teacher():
    cfg = make_cfg()
    t = tensors(cfg, LENGTHS, torch.float64, seed=3)
    q, k = t["q"].requires_grad_(), t["k"].requires_grad_()
    qi, ki = t["qi"].requires_grad_(), t["ki"].requires_grad_()
    out, kl = mt.msa_attention(q, k, t["v"], qi, ki, t["cu_q"], t["cu_k"], 0, 0, cfg, "sparse", 1.0)
    kl.backward()
    assert q.grad is None and k.grad is None
    assert qi.grad.abs().sum() > 0 and ki.grad.abs().sum() > 0


# ---- the layer against the pure-PyTorch reference ----------------------------------------------

def reference_layer(layer, hidden, cu_seqlens, mode):
    cfg = layer.cfg
    T = hidden.shape[0]
    q = layer.q_proj(hidden).view(T, cfg.num_q_heads, cfg.head_dim)
    k = layer.k_proj(hidden).view(T, cfg.num_kv_heads, cfg.head_dim)
    v = layer.v_proj(hidden).view(T, cfg.num_kv_heads, cfg.head_dim)
    pos = mt.positions_from_cu_seqlens(cu_seqlens, T)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    if layer.rotary is not None:
        q, k = layer.rotary(q, k, pos)
    qi, ki = layer.index_branch(hidden, pos)
    mask = reference_mask(cfg, cu_seqlens.tolist(), cu_seqlens.tolist(), qi.detach(), ki.detach(), mode)
    out, scores = reference_attention(cfg, q.double(), k.double(), v.double(), mask)
    kl = reference_kl(cfg, scores, qi.double(), ki.double(), mask, layer.kl_coeff)
    return layer.o_proj(out.to(hidden.dtype).reshape(T, -1)), kl


@pytest.mark.parametrize("mode", ["sparse", "warmup", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 1)])
def test_layer_matches_reference(mode, dtype, hq, hkv):
    torch.manual_seed(4)
    lengths = [(5, 5), (16, 16), (23, 23)]
    layer = mt.MSAAttention(32, hq, hkv, 8, index_head_dim=8, block_size=4, topk=3, mode=mode,
                            kl_coeff=0.5, index_norm=True, qk_norm=True,
                            rotary=mt.RotaryEmbedding(4), dtype=dtype)
    cu_seqlens = cu(lengths, "q")
    hidden = torch.randn(int(cu_seqlens[-1]), 32, dtype=dtype)
    out, kl = layer(hidden, cu_seqlens)
    params = dict(layer.named_parameters())
    (out.float().square().sum() + kl).backward()
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    layer.zero_grad()
    out_ref, kl_ref = reference_layer(layer, hidden, cu_seqlens, mode)
    if mode == "dense":
        kl_ref = kl_ref * 0
    (out_ref.float().square().sum() + kl_ref).backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel(out, out_ref) < tol
    if mode != "dense":
        assert abs(kl.item() - kl_ref.item()) <= tol * max(abs(kl_ref.item()), 1e-3)
    for n, p in params.items():
        mine = grads.get(n, torch.zeros_like(p))
        ref_grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if ref_grad.abs().sum() == 0:
            assert mine.abs().sum() == 0, n
        else:
            assert rel(mine, ref_grad) < (1e-3 if dtype == torch.float32 else 5e-2), n


def test_kl_detach_in_layer():
    """The KL term trains W_qi / W_ki only: q/k/v/o projections and the hidden states get nothing."""
    torch.manual_seed(5)
    layer = mt.MSAAttention(32, 8, 2, 8, index_head_dim=8, block_size=4, topk=3, mode="sparse")
    cu_seqlens = cu([(7, 7), (20, 20)], "q")
    hidden = torch.randn(27, 32, requires_grad=True)
    _, kl = layer(hidden, cu_seqlens)
    assert kl.item() > 0
    kl.backward()
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        assert proj.weight.grad is None or proj.weight.grad.abs().sum() == 0
    assert hidden.grad is None or hidden.grad.abs().sum() == 0
    assert layer.qi_proj.weight.grad.abs().sum() > 0
    assert layer.ki_proj.weight.grad.abs().sum() > 0


def test_convert_gqa_to_msa_reuses_weights():
    class GQA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_key_value_heads, self.head_dim = 8, 2, 8
            self.q_proj = torch.nn.Linear(32, 64, bias=False)
            self.k_proj = torch.nn.Linear(32, 16, bias=False)
            self.v_proj = torch.nn.Linear(32, 16, bias=False)
            self.o_proj = torch.nn.Linear(64, 32, bias=False)

    torch.manual_seed(6)
    gqa = GQA()
    layer = mt.convert_gqa_to_msa(gqa, index_head_dim=8, block_size=4, topk=3)
    assert layer.q_proj.weight is gqa.q_proj.weight and layer.mode == "warmup"
    cu_seqlens = cu([(9, 9), (14, 14)], "q")
    hidden = torch.randn(23, 32)
    out_warm, kl = layer(hidden, cu_seqlens)
    out_dense, _ = layer(hidden, cu_seqlens, mode="dense")
    assert torch.allclose(out_warm, out_dense) and kl.item() > 0
    # Dense causal GQA in plain PyTorch gives the same output: the conversion keeps the model.
    mask = reference_mask(layer.cfg, cu_seqlens.tolist(), cu_seqlens.tolist(),
                          torch.zeros(23, 2, 8), torch.zeros(23, 8), "dense")
    q = gqa.q_proj(hidden).view(23, 8, 8)
    k, v = gqa.k_proj(hidden).view(23, 2, 8), gqa.v_proj(hidden).view(23, 2, 8)
    ref_out = gqa.o_proj(reference_attention(layer.cfg, q, k, v, mask)[0].reshape(23, 64))
    assert rel(out_dense, ref_out) < 1e-5


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    cfg = make_cfg()
    t = tensors(cfg, LENGTHS, torch.float32, seed=7)
    c, s = mt.config_args(cfg)

    def f(q, k, v, qi, ki, cu_q, cu_k):
        topk, _ = torch.ops.msa.index_topk(qi, ki, cu_q, cu_k, c, s, 0, 0, 1.0, False)
        out, lse = torch.ops.msa.sparse_attention_fwd(q, k, v, topk, cu_q, cu_k, c, s, 0, 0)
        loss, _, _ = torch.ops.msa.kl_alignment(q, k, lse, qi, ki, topk, cu_q, cu_k, c, s, 0, 0, 1.0)
        return out * 2, loss

    args = [t[n] for n in ("q", "k", "v", "qi", "ki", "cu_q", "cu_k")]
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(*args)
    assert rel(compiled[0], eager[0]) < 1e-6 and rel(compiled[1], eager[1]) < 1e-6

    # msa_attention with autograd under compile as well.
    def g(q, k, v, qi, ki, cu_q, cu_k):
        out, kl = mt.msa_attention(q, k, v, qi, ki, cu_q, cu_k, 0, 0, (c, s), "sparse", 1.0)
        return out.square().sum() + kl

    req = [a.clone().requires_grad_() for a in args[:5]]
    torch.compile(g, fullgraph=True, backend=backend)(*req, *args[5:]).backward()
    assert all(a.grad is not None for a in req)


def test_torch_op_errors_are_msa_errors():
    cfg = make_cfg()
    t = tensors(cfg, LENGTHS, torch.float32, seed=8)
    with pytest.raises(msa.ArgumentError) as info:
        mt.index_topk(t["qi"][:, :1], t["ki"], t["cu_q"], t["cu_k"], cfg)
    assert info.value.argument == "qi"


# ---- dense main branch through torch SDPA --------------------------------------------------------

def count_sdpa_calls(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def dense_out_and_grads(t, cfg, backend, max_q=0, max_k=0):
    q, k, v = (t[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, kl = mt.msa_attention(q, k, v, None, None, t["cu_q"], t["cu_k"], max_q, max_k, cfg,
                               "dense", dense_backend=backend)
    assert kl.item() == 0
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(dout.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lengths,max_len", [([(29, 29)], 0), ([(13, 13)] * 3, 0),
                                             ([(13, 13)] * 3, 13), ([(1, 1)] * 2, 0)])
def test_dense_sdpa_matches_msa_kernel(monkeypatch, dtype, hq, hkv, lengths, max_len):
    cfg = make_cfg(hq, hkv, d=16, scale=0.3 if len(lengths) == 3 else 0.0)
    t = tensors(cfg, lengths, dtype, seed=12)
    calls = count_sdpa_calls(monkeypatch)
    mine = dense_out_and_grads(t, cfg, "msa", max_len, max_len)
    assert not calls
    theirs = dense_out_and_grads(t, cfg, "sdpa", max_len, max_len)
    assert len(calls) == 1 and calls[0]["is_causal"]
    assert calls[0]["scale"] == (torch.tensor(0.3, dtype=torch.float32).item()
                                 if len(lengths) == 3 else f32_inv_sqrt(16))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(("out", "dq", "dk", "dv"), theirs, mine):
        # Absolute floor: with one key per sequence dq is 0 up to rounding on both sides.
        assert (a - b).double().norm() <= tol * (b.double().norm() + 1), name
        assert torch.isfinite(a).all(), name
    # "auto" keeps our kernel on CPU.
    auto = dense_out_and_grads(t, cfg, "auto", max_len, max_len)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(auto, mine))


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("lengths,max_q,max_k", [
    ([(5, 5), (16, 16), (23, 23)], 0, 0),   # ragged
    ([(5, 5), (16, 16), (23, 23)], 23, 23),
    ([(8, 8), (8, 8)], 16, 16),             # equal lengths, but max_seqlen only bounds them
    ([(3, 17)], 0, 0),                      # a query suffix (chunked prefill)
    ([(4, 12), (4, 12)], 4, 12)])
def test_dense_sdpa_falls_back_to_msa_kernel(monkeypatch, backend, lengths, max_q, max_k):
    cfg = make_cfg(8, 2, d=16)
    t = tensors(cfg, lengths, torch.float32, seed=13)
    calls = count_sdpa_calls(monkeypatch)
    mine = dense_out_and_grads(t, cfg, "msa", max_q, max_k)
    other = dense_out_and_grads(t, cfg, backend, max_q, max_k)
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(other, mine))


def test_dense_backend_switches(monkeypatch):
    torch.manual_seed(14)
    lengths = [(9, 9), (9, 9)]
    layer = mt.MSAAttention(32, 8, 2, 8, index_head_dim=8, block_size=4, topk=3, mode="dense",
                            dense_backend="sdpa", dtype=torch.float64)
    cu_seqlens = cu(lengths, "q")
    hidden = torch.randn(18, 32, dtype=torch.float64)
    calls = count_sdpa_calls(monkeypatch)
    out_sdpa, _ = layer(hidden, cu_seqlens)
    assert len(calls) == 1
    layer.dense_backend = None
    monkeypatch.setattr(mt, "dense_backend", "msa")  # what MSA_DENSE_BACKEND=msa sets at import
    out_msa, _ = layer(hidden, cu_seqlens)
    monkeypatch.setattr(mt, "dense_backend", "sdpa")
    out_sdpa2, _ = layer(hidden, cu_seqlens)
    assert len(calls) == 2 and torch.equal(out_sdpa, out_sdpa2) and rel(out_sdpa, out_msa) < 1e-12
    # Warmup keeps our kernel whatever the switch says: its KL needs the main branch's LSE.
    out_warm, kl = layer(hidden, cu_seqlens, mode="warmup")
    assert len(calls) == 2 and torch.equal(out_warm, out_msa) and kl.item() > 0
    with pytest.raises(msa.ArgumentError) as info:
        mt.msa_attention(*[hidden.view(18, 4, 8)] * 3, None, None, cu_seqlens, cu_seqlens, 0, 0,
                         make_cfg(4, 4, d=8), "dense", dense_backend="cudnn")
    assert info.value.argument == "dense_backend"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_dense_sdpa(backend):
    cfg = make_cfg(8, 2, d=16)
    t = tensors(cfg, [(12, 12)] * 2, torch.float32, seed=15)
    c, s = mt.config_args(cfg)

    def g(q, k, v, cu_q, cu_k, max_len):
        out, _ = mt.msa_attention(q, k, v, None, None, cu_q, cu_k, max_len, max_len, (c, s),
                                  "dense", dense_backend="sdpa")
        return out.square().sum()

    for max_len in (12, 0):  # 0: cu_seqlens unreadable under compile, so our kernel runs
        req = [t[n].clone().requires_grad_() for n in ("q", "k", "v")]
        eager = [a.detach().clone().requires_grad_() for a in req]
        g(*eager, t["cu_q"], t["cu_k"], max_len).backward()
        torch.compile(g, fullgraph=True, backend=backend)(*req, t["cu_q"], t["cu_k"],
                                                          max_len).backward()
        for a, b in zip(req, eager):
            assert rel(a.grad, b.grad) < 1e-5


# ---- CUDA --------------------------------------------------------------------------------------

# The CUDA attention forward takes bfloat16/float16, head_dim 64 or 128, block_size % 64 == 0.
CUDA_LENGTHS = [(1, 1), (65, 65), (130, 130), (3, 200), (16, 300)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # the CUDA index branch's dtypes
@pytest.mark.parametrize("hq,hkv", [(4, 4), (16, 4), (16, 1)])
def test_cuda_index_topk_matches_cpu(dtype, hq, hkv):
    cfg = make_cfg(hq, hkv, d=64, di=64, block=64, topk=3)
    t = tensors(cfg, CUDA_LENGTHS, dtype, seed=9)
    g = {n: x.cuda() for n, x in t.items()}
    topk_c, lse_c = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)
    topk_g, lse_g = mt.index_topk(g["qi"], g["ki"], g["cu_q"], g["cu_k"], cfg)
    topk_only, _ = mt.index_topk(g["qi"], g["ki"], g["cu_q"], g["cu_k"], cfg, with_lse=False)
    torch.cuda.synchronize()
    assert torch.equal(topk_only, topk_g)  # the max-only pooling ranks exactly as with the LSE
    # Selection compared as sets; near-ties in low precision may differ, so allow a few rows.
    same = (topk_c.sort(-1).values == topk_g.cpu().sort(-1).values).all(-1).float().mean().item()
    assert same >= 0.97, same
    assert rel(lse_g, lse_c) < 1e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (16, 4, 128), (16, 1, 64)])
def test_cuda_forward_matches_cpu(dtype, hq, hkv, d):
    cfg = make_cfg(hq, hkv, d=d, di=64, block=64, topk=3)
    t = tensors(cfg, CUDA_LENGTHS, dtype, seed=10)
    g = {n: x.cuda() for n, x in t.items()}
    c, s = mt.config_args(cfg)
    topk, _ = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)
    for sparse in (True, False):
        if sparse:
            out_c, l_c = torch.ops.msa.sparse_attention_fwd(t["q"], t["k"], t["v"], topk, t["cu_q"], t["cu_k"], c, s, 0, 0)
            out_g, l_g = torch.ops.msa.sparse_attention_fwd(g["q"], g["k"], g["v"], topk.cuda(), g["cu_q"], g["cu_k"], c, s, 0, 0)
        else:
            out_c, l_c = torch.ops.msa.dense_attention_fwd(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], c, s, 0, 0)
            out_g, l_g = torch.ops.msa.dense_attention_fwd(g["q"], g["k"], g["v"], g["cu_q"], g["cu_k"], c, s, 0, 0)
        assert rel(out_g, out_c) < 1e-2 and rel(l_g, l_c) < 1e-3, sparse


@needs_cuda
def test_cuda_graph_capture_of_forward():
    cfg = make_cfg(16, 4, d=64, di=64, block=64, topk=3)
    lengths = [(8, 200), (16, 16)]
    g = {n: x.cuda() for n, x in tensors(cfg, lengths, torch.bfloat16, seed=10).items()}
    c, s = mt.config_args(cfg)
    maxq, maxk = 16, 200  # host-side bounds: no device-to-host copy inside the graph

    def step():
        topk, _ = torch.ops.msa.index_topk(g["qi"], g["ki"], g["cu_q"], g["cu_k"], c, s, maxq, maxk, 1.0, False)
        return torch.ops.msa.sparse_attention_fwd(g["q"], g["k"], g["v"], topk, g["cu_q"], g["cu_k"], c, s, maxq, maxk)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(captured, eager) < 1e-6


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backward_and_kl_match_cpu_or_say_not_supported(dtype):
    """Training ops on CUDA: either they match the CPU backend, or (a build without the CUDA
    training kernels) they raise NotSupportedError - never a wrong answer or another error."""
    cfg = make_cfg(4, 2, d=64, di=64, block=64, topk=3)
    t = tensors(cfg, CUDA_LENGTHS, dtype, seed=11)
    g = {n: x.cuda() for n, x in t.items()}
    c, s = mt.config_args(cfg)
    topk, _ = mt.index_topk(t["qi"], t["ki"], t["cu_q"], t["cu_k"], cfg)
    dout = torch.randn_like(t["q"])
    out, lse = torch.ops.msa.sparse_attention_fwd(t["q"], t["k"], t["v"], topk, t["cu_q"], t["cu_k"], c, s, 0, 0)
    cpu_grads = torch.ops.msa.sparse_attention_bwd(t["q"], t["k"], t["v"], topk, out, lse, dout, t["cu_q"], t["cu_k"], c, s, 0, 0, False)
    cpu_kl = torch.ops.msa.kl_alignment(t["q"], t["k"], lse, t["qi"], t["ki"], topk, t["cu_q"], t["cu_k"], c, s, 0, 0, 1.0)
    topk_g, out_g, lse_g = topk.cuda(), out.cuda(), lse.cuda()
    try:
        gpu_grads = torch.ops.msa.sparse_attention_bwd(g["q"], g["k"], g["v"], topk_g, out_g, lse_g, dout.cuda(), g["cu_q"], g["cu_k"], c, s, 0, 0, False)
    except msa.NotSupportedError as e:
        assert "CUDA" in str(e)
    else:
        for name, a, b in zip(("dq", "dk", "dv"), gpu_grads, cpu_grads):
            assert rel(a, b) < 2e-2, name
    try:
        gpu_kl = torch.ops.msa.kl_alignment(g["q"], g["k"], lse_g, g["qi"], g["ki"], topk_g, g["cu_q"], g["cu_k"], c, s, 0, 0, 1.0)
    except msa.NotSupportedError as e:
        assert "CUDA" in str(e)
    else:
        for name, a, b in zip(("loss", "dqi", "dki"), gpu_kl, cpu_kl):
            assert rel(a, b) < 2e-2, name
