"""msa.hf against transformers' own MiniMax-M3 eager path (skipped without torch or transformers).

Per layer, on identical inputs: a recording attention function runs both the library and the
model's eager path (its indexer's `build_block_mask` + `eager_attention_forward`) and keeps the
relative error. End to end: logits, generated tokens, and every layer's block selection (as sets)
of an eager model vs the same model with attn_implementation="msa". Prefill, chunked prefill over a
cache and token-by-token decode, at lengths around block edges and past 16 blocks.
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

# (Hq, Hkv, block, topk): GQA 4, 1 and 16; topk 16 with sequences past 16 blocks.
SHAPES = {"g4": (8, 2, 8, 4), "g1": (4, 4, 8, 16), "g16": (16, 1, 16, 3)}


def make_config(hq, hkv, block, topk, layers=("minimax_m3_sparse", "full_attention", "minimax_m3_sparse")):
    return MiniMaxM3VLTextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=len(layers),
        num_attention_heads=hq, num_key_value_heads=hkv, head_dim=32, num_local_experts=4,
        num_experts_per_tok=2, dense_intermediate_size=64, shared_intermediate_size=32,
        index_n_heads=hkv, index_head_dim=32, index_block_size=block, index_topk_blocks=topk,
        layer_types=list(layers), mlp_layer_types=["dense"] * len(layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=1, eos_token_id=None, pad_token_id=0)


def make_model(shape, dtype, seed=0, attn="eager"):
    torch.manual_seed(seed)
    model = m3.MiniMaxM3VLForCausalLM._from_config(make_config(*SHAPES[shape]),
                                                   attn_implementation=attn).eval()
    with torch.no_grad():  # norms start at zero (weight + 1); make them and the router matter
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.3)
    return model.to(dtype)


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- per-layer parity on identical inputs ----------------------------------------------------

class Recorder:
    """An attention function that runs msa and the model's eager path on the same tensors."""

    def __init__(self):
        self.errors, self.calls = [], 0

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
            mask = torch.zeros(future.shape, dtype=query.dtype).masked_fill(
                future, torch.finfo(query.dtype).min)
        ref, _ = m3.eager_attention_forward(module, query, key, value, mask, scaling)
        self.errors.append(rel(out, ref))
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_layer_parity_prefill_chunked_decode(recorder, shape, dtype, tol):
    model = make_model(shape, dtype, attn="msa_parity")
    block, topk = SHAPES[shape][2], SHAPES[shape][3]
    lengths = [1, block - 1, block, block + 1, topk * block + 1, (topk + 2) * block + 3]
    lengths.append(17 * block + 5)  # past 16 blocks
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in lengths:  # whole prefill
            model(torch.randint(3, 96, (1, n), generator=g))
        n = lengths[-1]
        ids = torch.randint(3, 96, (1, n + 12), generator=g)
        cache = DynamicCache(config=model.config)
        model(ids[:, : n - 2 * block - 1], past_key_values=cache)  # prefix
        model(ids[:, n - 2 * block - 1: n], past_key_values=cache)  # chunk over the cached prefix
        for t in range(n, n + 12):  # token-by-token decode
            model(ids[:, t: t + 1], past_key_values=cache)
    assert recorder.calls == 3 * (len(lengths) + 2 + 12)
    assert max(recorder.errors) < tol, max(recorder.errors)


# ---- end to end: selections as sets, logits, generation --------------------------------------

def selections(model):
    """Hooks every indexer; returns the list its outputs are appended to."""
    seen = []
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.register_forward_hook(lambda mod, inp, out: seen.append(out))
    return seen


def as_sets(block_indices):
    rows = block_indices.reshape(-1, block_indices.shape[-1]).tolist()
    return [frozenset(i for i in r if i >= 0) for r in rows]


def run_steps(model, ids, prefix, decode):
    cache = DynamicCache(config=model.config)
    logits = [model(ids[:, :prefix], past_key_values=cache).logits]
    for t in range(prefix, prefix + decode):
        logits.append(model(ids[:, t: t + 1], past_key_values=cache).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("shape", ["g4", "g1"])
def test_model_parity_fp32(shape):
    block = SHAPES[shape][2]
    ids = torch.randint(3, 96, (1, 17 * block + 10), generator=torch.Generator().manual_seed(2))
    results = {}
    for attn in ("eager", "msa"):
        model = make_model(shape, torch.float32, attn=attn)
        sel = selections(model)
        with torch.no_grad():
            results[attn] = (run_steps(model, ids, 17 * block + 1, 9), sel)
    (ref, ref_sel), (got, got_sel) = results["eager"], results["msa"]
    assert rel(got, ref) < F32_TOL
    assert len(ref_sel) == len(got_sel) == 2 * 10
    for a, b in zip(ref_sel, got_sel):
        assert as_sets(a) == as_sets(b)


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_matches_eager(cache):
    ids = torch.randint(3, 96, (1, 60), generator=torch.Generator().manual_seed(3))
    out = {}
    for attn in ("eager", "msa"):
        model = make_model("g4", torch.float32, attn=attn)
        with torch.no_grad():
            out[attn] = model.generate(ids, max_new_tokens=12, do_sample=False,
                                       cache_implementation=cache)
    assert torch.equal(out["eager"], out["msa"])


def test_library_indexer_selects_the_same_sets():
    shape = "g4"
    block = SHAPES[shape][2]
    ids = torch.randint(3, 96, (1, 17 * block + 3), generator=torch.Generator().manual_seed(4))
    picks = []
    for swap in (False, True):
        model = make_model(shape, torch.float32, attn="msa")
        if swap:
            assert msa.hf.use_msa_indexer(model) == 2
        sel = selections(model)
        with torch.no_grad():
            logits = run_steps(model, ids, 17 * block - 6, 9)
        picks.append((logits, sel))
    (ref, ref_sel), (got, got_sel) = picks
    assert len(ref_sel) == len(got_sel) == 2 * 10
    for a, b in zip(ref_sel, got_sel):
        assert a.shape == b.shape
        assert as_sets(a) == as_sets(b)
    assert rel(got, ref) < F32_TOL


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
