"""msa.hf against transformers' own MiniMax-M3 eager path (skipped without torch or transformers).

Per layer, on identical inputs: a recording attention function runs both the library and the
model's eager path (its indexer's `build_block_mask` + `eager_attention_forward`) and keeps the
relative error. End to end: logits, generated tokens, and every layer's block selection (as sets)
of an eager model vs the same model with attn_implementation="msa". Prefill, chunked prefill over a
cache and token-by-token decode, at lengths around block edges and past 16 blocks.

Every parity test runs on the CPU and, with a GPU and a CUDA build of msa, on CUDA. The CUDA
kernels take bfloat16/float16, head_dim 64/128 and blocks of whole 64-key tiles, so the CUDA cases
use head_dim 64 and blocks of 64 (lengths 63, 64, 65, 16*64+1, 20*64+7, ...). In bf16 the end-to-end
comparisons are measured against the model's own bf16 noise floor (sdpa vs eager on the same model):
layers after the first see slightly different hidden states, so near-tied block scores may pick
different blocks; the first sparse layer (identical inputs) must select identical sets.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.models.minimax_m3_vl")

import msa  # noqa: E402
import msa.hf  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as m3  # noqa: E402
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import (  # noqa: E402
    MiniMaxM3VLTextConfig,
)

F32_TOL, BF16_TOL = 1e-5, 1e-2
VOCAB = 96

HAS_CUDA = torch.cuda.is_available() and msa.cuda_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of msa")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# (Hq, Hkv, block, topk, head_dim): GQA 4, 1 and 16; topk 16 with sequences past 16 blocks.
SHAPES = {
    "cpu": {"g4": (8, 2, 8, 4, 32), "g1": (4, 4, 8, 16, 32), "g16": (16, 1, 16, 3, 32)},
    # The CUDA kernels: head_dim 64 or 128, block_size a multiple of 64.
    "cuda": {"g4": (8, 2, 64, 4, 64), "g1": (4, 4, 64, 16, 64), "g16": (16, 1, 64, 3, 64)},
}
# dtype -> tolerance of one attention call against eager; CUDA takes 16-bit floats only.
DTYPES = {"cpu": {torch.float32: F32_TOL, torch.bfloat16: BF16_TOL},
          "cuda": {torch.bfloat16: BF16_TOL, torch.float16: BF16_TOL}}
SHAPE_NAMES = sorted(SHAPES["cpu"])


def shape_of(shape, device):
    return SHAPES[device][shape]


def make_config(hq, hkv, block, topk, head_dim=32,
                layers=("minimax_m3_sparse", "full_attention", "minimax_m3_sparse")):
    return MiniMaxM3VLTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=len(layers),
        num_attention_heads=hq, num_key_value_heads=hkv, head_dim=head_dim, num_local_experts=4,
        num_experts_per_tok=2, dense_intermediate_size=64, shared_intermediate_size=32,
        index_n_heads=hkv, index_head_dim=head_dim, index_block_size=block, index_topk_blocks=topk,
        layer_types=list(layers), mlp_layer_types=["dense"] * len(layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=1, eos_token_id=None, pad_token_id=0)


def make_model(shape, dtype, seed=0, attn="eager", device="cpu"):
    torch.manual_seed(seed)
    model = m3.MiniMaxM3VLForCausalLM._from_config(make_config(*shape_of(shape, device)),
                                                   attn_implementation=attn).eval()
    with torch.no_grad():  # norms start at zero (weight + 1); make them and the router matter
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
    return model.to(device=device, dtype=dtype)


def tokens(n, seed, device="cpu", batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed)).to(device)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- per-layer parity on identical inputs ----------------------------------------------------

class Recorder:
    """An attention function that runs msa and the model's eager path on the same tensors."""

    def __init__(self):
        self.errors, self.where, self.calls = [], [], 0

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 block_indices=None, position_ids=None, **kw):
        out, _ = msa.hf.msa_attention_forward(module, query, key, value, attention_mask, scaling,
                                              dropout, block_indices, position_ids, **kw)
        q_len, slots = query.shape[2], key.shape[2]
        pos = msa.hf.query_positions(position_ids, query.shape[0], q_len, slots).to(query.device)
        if block_indices is not None:
            mask = module.indexer.build_block_mask(block_indices, None, slots, query.dtype,
                                                   query.device, pos)
        else:
            future = torch.arange(slots, device=query.device)[None, None, None, :] > pos[:, None, :, None]
            mask = torch.zeros(future.shape, dtype=query.dtype, device=query.device).masked_fill(
                future, torch.finfo(query.dtype).min)
        ref, _ = m3.eager_attention_forward(module, query, key, value, mask, scaling)
        err = rel(out, ref)
        self.errors.append(err)
        self.where.append(f"layer {module.layer_idx} q {q_len} keys {slots} "
                          f"{'sparse' if block_indices is not None else 'dense'}: {err:.2e}")
        self.calls += 1
        return out, None


@pytest.fixture
def recorder():
    rec = Recorder()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("msa_parity", rec)
    AttentionMaskInterface.register("msa_parity", flash_attention_mask)
    return rec


def lengths_for(device, block, topk):
    """Around block edges, at the top-k edge, past 16 blocks."""
    lengths = {1, block - 1, block, block + 1, topk * block + 1, (topk + 2) * block + 3, 17 * block + 5}
    if device == "cuda":
        lengths |= {16 * block + 1, 20 * block + 7}
    return sorted(lengths)


DEVICE_DTYPES = [(d, t) for d in ("cpu", "cuda") for t in DTYPES[d]]


@pytest.mark.parametrize("device,dtype", [
    pytest.param(d, t, marks=needs_cuda) if d == "cuda" else (d, t) for d, t in DEVICE_DTYPES])
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_layer_parity_prefill_chunked_decode(recorder, shape, dtype, device):
    tol = DTYPES[device][dtype]
    model = make_model(shape, dtype, attn="msa_parity", device=device)
    block, topk = shape_of(shape, device)[2:4]
    lengths = lengths_for(device, block, topk)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in lengths:  # whole prefill
            model(torch.randint(3, VOCAB, (1, n), generator=g).to(device))
        n = lengths[-1]
        ids = torch.randint(3, VOCAB, (1, n + 12), generator=g).to(device)
        cache = DynamicCache(config=model.config)
        model(ids[:, : n - 2 * block - 1], past_key_values=cache)  # prefix
        model(ids[:, n - 2 * block - 1: n], past_key_values=cache)  # chunk over the cached prefix
        for t in range(n, n + 12):  # token-by-token decode
            model(ids[:, t: t + 1], past_key_values=cache)
    assert recorder.calls == 3 * (len(lengths) + 2 + 12)
    worst = max(range(len(recorder.errors)), key=recorder.errors.__getitem__)
    assert recorder.errors[worst] < tol, recorder.where[worst]


# ---- end to end: selections as sets, logits, generation --------------------------------------

def selections(model):
    """Hooks every indexer; returns the list its outputs ([b, heads, q, k'] on the host) go to."""
    seen = []
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.register_forward_hook(
                lambda mod, inp, out: seen.append(out.detach().cpu()))
    return seen


def as_sets(block_indices):
    rows = block_indices.reshape(-1, block_indices.shape[-1]).tolist()
    return [frozenset(i for i in r if i >= 0) for r in rows]


def differing_rows(a_list, b_list, every=1, first=0):
    """Rows (query, head) whose selected sets differ, over the calls first, first+every, ..."""
    assert len(a_list) == len(b_list)
    bad = total = 0
    for a, b in list(zip(a_list, b_list))[first::every]:
        assert a.shape == b.shape, (a.shape, b.shape)
        sa, sb = as_sets(a), as_sets(b)
        bad += sum(x != y for x, y in zip(sa, sb))
        total += len(sa)
    return bad, total


def run_steps(model, ids, prefix, decode):
    cache = DynamicCache(config=model.config)
    logits = [model(ids[:, :prefix], past_key_values=cache).logits]
    for t in range(prefix, prefix + decode):
        logits.append(model(ids[:, t: t + 1], past_key_values=cache).logits)
    return torch.cat(logits, dim=1).float()


def run_models(shape, dtype, device, ids, prefix, decode, attns, indexer_swap=()):
    """attn -> (logits of prefill + decode steps, every indexer output) with the same weights.
    The swapped indexers run msa.index_topk on every call, decode steps included."""
    results = {}
    for attn in attns:
        model = make_model(shape, dtype, attn=attn.split("+")[0], device=device)
        if attn in indexer_swap:
            assert msa.hf.use_msa_indexer(model, min_q_len=1) == 2
        sel = selections(model)
        with torch.no_grad():
            results[attn] = (run_steps(model, ids, prefix, decode), sel)
    return results


E2E = [("cpu", torch.float32), pytest.param("cuda", torch.bfloat16, marks=needs_cuda)]


@pytest.mark.parametrize("device,dtype", E2E)
@pytest.mark.parametrize("shape", ["g4", "g1"])
def test_model_parity(shape, device, dtype):
    """Prefill past 16 blocks + 9 decode steps. fp32: logits within 1e-5, every selection identical.
    bf16: the first sparse layer (identical inputs) selects identical sets; later layers and logits
    stay within the model's own bf16 noise (sdpa vs eager)."""
    block = shape_of(shape, device)[2]
    ids = tokens(17 * block + 10, 2, device)
    attns = ("eager", "msa") if dtype == torch.float32 else ("eager", "msa", "sdpa")
    res = run_models(shape, dtype, device, ids, 17 * block + 1, 9, attns)
    (ref, ref_sel), (got, got_sel) = res["eager"], res["msa"]
    assert len(ref_sel) == len(got_sel) == 2 * 10
    if dtype == torch.float32:
        assert rel(got, ref) < F32_TOL
        assert differing_rows(ref_sel, got_sel) == (0, differing_rows(ref_sel, ref_sel)[1])
        return
    first_layer = differing_rows(ref_sel, got_sel, every=2, first=0)
    assert first_layer[0] == 0, f"first sparse layer: {first_layer[0]} of {first_layer[1]} rows differ"
    floor_err, floor_rows = rel(res["sdpa"][0], ref), differing_rows(ref_sel, res["sdpa"][1])[0]
    got_rows, total = differing_rows(ref_sel, got_sel)
    assert rel(got, ref) <= 2 * floor_err + BF16_TOL, (rel(got, ref), floor_err)
    assert got_rows <= 2 * floor_rows + total // 100, (got_rows, floor_rows, total)


@pytest.mark.parametrize("device,dtype", E2E)
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_matches_eager(cache, device, dtype):
    """Greedy tokens: identical in fp32; in bf16 identical up to the first near-tie of eager's logits."""
    block = shape_of("g4", device)[2]
    prompt = 7 * block + 4
    ids = tokens(prompt, 3, device)
    out = {}
    for attn in ("eager", "msa"):
        model = make_model("g4", dtype, attn=attn, device=device)
        with torch.no_grad():
            out[attn] = model.generate(ids, max_new_tokens=12, do_sample=False,
                                       cache_implementation=cache)
    if dtype == torch.float32 or torch.equal(out["eager"], out["msa"]):
        assert torch.equal(out["eager"], out["msa"])
        return
    t = int((out["eager"][0] != out["msa"][0]).nonzero()[0])  # first differing token
    with torch.no_grad():
        logits = model(out["eager"][:, :t]).logits[0, -1].float()  # msa model, shared prefix
    mine, theirs = int(out["msa"][0, t]), int(out["eager"][0, t])
    gap = float(logits[theirs] - logits[mine]).__abs__()
    assert gap < 0.1, f"token {t - prompt}: msa {mine} vs eager {theirs}, logit gap {gap:.3f}"


@pytest.mark.parametrize("device,dtype", E2E)
def test_library_indexer_selects_the_same_sets(device, dtype):
    shape = "g4"
    block = shape_of(shape, device)[2]
    ids = tokens(17 * block + 3, 4, device)
    res = run_models(shape, dtype, device, ids, 17 * block - 6, 9, ("msa", "msa+indexer"),
                     indexer_swap=("msa+indexer",))
    (ref, ref_sel), (got, got_sel) = res["msa"], res["msa+indexer"]
    assert len(ref_sel) == len(got_sel) == 2 * 10
    if dtype == torch.float32:
        assert differing_rows(ref_sel, got_sel)[0] == 0
        assert rel(got, ref) < F32_TOL
        return
    # bf16: the library scores in bf16 with fp32 accumulation, the model in fp32 from bf16 values:
    # same products, another summation order, so only exact near-ties may fall the other way.
    bad, total = differing_rows(ref_sel, got_sel, every=2, first=0)
    assert bad <= total // 1000, f"first sparse layer: {bad} of {total} rows differ"
    assert rel(got, ref) < 5 * BF16_TOL, rel(got, ref)


def test_f32_on_cuda_is_refused_clearly():
    """The CUDA kernels take 16-bit floats, head_dim 64/128, blocks of 64k: msa.hf names the model's
    setting. Runs without a GPU on a stand-in tensor (the check reads device type, dtype, shape)."""

    class FakeCuda:  # the checks read .device.type, .dtype and .shape only
        def __init__(self, t):
            self.device, self.dtype, self.shape = torch.device("cuda"), t.dtype, t.shape

    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.check_cuda_support(FakeCuda(torch.randn(1, 8, 5, 32)), 64)
    assert err.value.argument == "query" and "bfloat16" in str(err.value)
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.check_cuda_support(FakeCuda(torch.randn(1, 8, 5, 32, dtype=torch.bfloat16)), 64)
    assert err.value.argument == "head_dim"
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.check_cuda_support(FakeCuda(torch.randn(1, 8, 5, 64, dtype=torch.bfloat16)), 16)
    assert err.value.argument == "index_block_size"
    msa.hf.check_cuda_support(FakeCuda(torch.randn(1, 8, 5, 128, dtype=torch.bfloat16)), 128)
    msa.hf.check_cuda_support(torch.randn(1, 8, 5, 32), 8)  # the CPU takes all of these


@needs_cuda
def test_f32_model_on_cuda_is_refused():
    model = make_model("g4", torch.float32, attn="msa", device="cuda")
    with pytest.raises(msa.ArgumentError) as err, torch.no_grad():
        model(tokens(70, 7, "cuda"))
    assert err.value.argument == "query" and "float32" in str(err.value)
    msa.hf.use_msa_indexer(model)
    with pytest.raises(msa.ArgumentError) as err, torch.no_grad():
        model(tokens(70, 7, "cuda"))
    assert err.value.argument == "hidden_states"


@needs_cuda
def test_bad_cuda_block_size_is_refused():
    model = make_model("g4", torch.bfloat16, attn="msa", device="cpu")  # the CPU shape: block 8
    model = model.to("cuda")
    with pytest.raises(msa.ArgumentError) as err, torch.no_grad():
        model(tokens(40, 8, "cuda"))
    assert err.value.argument in ("head_dim", "index_block_size")


def test_msa_indexer_leaves_short_calls_to_the_model(monkeypatch):
    """Default min_q_len: prefill through msa.index_topk, decode steps through the model's indexer."""
    model = make_model("g4", torch.float32, attn="msa", device="cpu")
    assert msa.hf.use_msa_indexer(model) == 2
    calls = []
    real = msa.torch.index_topk

    def counting(qi, *args, **kwargs):
        calls.append(qi.shape[0])
        return real(qi, *args, **kwargs)

    monkeypatch.setattr(msa.torch, "index_topk", counting)
    ids = tokens(40, 11, "cpu")
    with torch.no_grad():
        run_steps(model, ids, 30, 3)
    assert calls == [30, 30]  # two sparse layers, the prefill only
    assert msa.hf.use_msa_indexer(model, min_q_len=1) == 2  # re-swapping replaces the choice
    calls.clear()
    with torch.no_grad():
        run_steps(model, ids, 30, 2)
    assert calls == [30, 30, 1, 1, 1, 1]
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.use_msa_indexer(model, min_q_len=0)
    assert err.value.argument == "min_q_len"


# ---- padding and bad input -------------------------------------------------------------------

def test_right_padding_matches_eager_on_real_tokens():
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 27:] = 0
    out = {}
    for attn in ("eager", "msa"):
        model = make_model("g4", torch.float32, attn=attn)
        with torch.no_grad():
            out[attn] = model(ids, attention_mask=mask).logits
    assert rel(out["msa"][0], out["eager"][0]) < F32_TOL
    assert rel(out["msa"][1, :27], out["eager"][1, :27]) < F32_TOL


def test_left_padding_is_refused():
    model = make_model("g4", torch.float32, attn="msa")
    ids = torch.randint(3, 96, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(msa.ArgumentError) as err, torch.no_grad():
        model(ids, attention_mask=mask)
    assert err.value.argument == "attention_mask"


def test_bad_block_indices_and_dropout_are_refused():
    model = make_model("g4", torch.float32, attn="msa")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 8, 5, 32)
    k = v = torch.randn(1, 2, 5, 32)
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.msa_attention_forward(attn, q, k, v, None, 0.1,
                                     block_indices=torch.zeros(1, 1, 5, 4, dtype=torch.long))
    assert err.value.argument == "block_indices"
    future = torch.full((1, 2, 5, 1), 3, dtype=torch.long)  # block 3 lies after position 4
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.msa_attention_forward(attn, q, k, v, None, 0.1, block_indices=future)
    assert err.value.argument == "topk"
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.msa_attention_forward(attn, q, k, v, None, 0.1, dropout=0.1)
    assert err.value.argument == "dropout"
    attn.is_causal = False  # as the vision tower's attention
    with pytest.raises(msa.ArgumentError) as err:
        msa.hf.msa_attention_forward(attn, q, k, v, None, 0.1)
    assert err.value.argument == "module"


def test_to_msa_topk_keeps_sets_and_moves_local_last():
    bi = torch.tensor([[[[5, 2, 0, -1], [0, -1, -1, -1]]]])  # [1, 1, 2, 4], local first
    pos = torch.tensor([[41, 3]])                               # blocks 5 and 0 with B = 8
    topk = msa.hf.to_msa_topk(bi, pos, 8)
    assert topk.dtype == torch.int32 and topk.shape == (1, 2, 4)
    assert topk.tolist() == [[[2, 0, 5, -1], [0, -1, -1, -1]]]


def test_training_gradients_match_eager():
    ids = torch.randint(3, 96, (1, 70), generator=torch.Generator().manual_seed(6))
    grads = {}
    for attn in ("eager", "msa"):
        model = make_model("g4", torch.float32, attn=attn).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[attn] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["eager"].keys() == grads["msa"].keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.2.self_attn.k_proj.weight", "model.embed_tokens.weight"):
        assert rel(grads["msa"][name], grads["eager"][name]) < 1e-4, name
