"""msa.paged_torch: the serving ops as torch custom ops. A model step that appends and runs compiles
with torch.compile(fullgraph=True); compiled steps write exactly what eager msa.paged calls write
(caches, out, lse, topk), a second step with another plan and other lengths runs without
recompiling, and a call outside msa.paged.use_plan names the missing plan. Skipped without torch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import msa  # noqa: E402
import msa.paged  # noqa: E402
import msa.paged_torch  # noqa: E402
from test_paged import LENGTHS, Step, make_cfg  # noqa: E402

# Other kv lengths of the same requests, with the same page counts (B = 4): the same tensor shapes,
# another plan.
LONGER = [(q, k + d) for (q, k), d in zip(LENGTHS, (1, 2, -3, 2, 3, 3))]


def model_step(cu_q, kv_lens, page_table, q, qi, k_new, v_new, ki_new, k, v, ki, k_scale, v_scale,
               ki_scale, out, lse, topk, ws):
    """What a decode layer does around the attention: projections (here scalings), append, run."""
    batch = msa.paged.Batch(cu_q, kv_lens, page_table)
    cache = msa.paged.Cache(k, v, ki, k_scale, v_scale, ki_scale)
    msa.paged_torch.append(batch, k_new * 1.0, v_new, ki_new, cache)
    msa.paged_torch.run(batch, q * 1.0, qi, cache, out, lse, topk, ws)
    return out * 2.0


class Inputs:
    """One step's tensors: a cache holding the prefix, the new rows, fresh outputs and workspace."""

    def __init__(self, cfg, s, plan, head_major=False, fp8=False, device="cpu"):
        k, v, ki = s.prefix_cache(cfg, head_major=head_major)

        def t(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if head_major:  # keep the head-major storage: the view of its transpose
            self.k, self.v = (msa.paged.head_major(t(np.nan_to_num(x).swapaxes(1, 2))) for x in (k, v))
        else:
            self.k, self.v = t(np.nan_to_num(k)), t(np.nan_to_num(v))
        self.ki = t(np.nan_to_num(ki))
        self.scales = (None, None, None)
        if fp8:
            sc = 5.0 / 448
            self.k, self.v, self.ki = ((x / sc).to(torch.float8_e4m3fn) for x in (self.k, self.v, self.ki))
            if head_major:  # .to() of a transposed view is contiguous: back to head-major storage
                self.k, self.v = (msa.paged.head_major(x.transpose(1, 2).contiguous()) for x in (self.k, self.v))
            hkv = cfg.num_kv_heads
            self.scales = (torch.full((s.num_pages, hkv), sc, device=device),
                           torch.full((s.num_pages, hkv), sc, device=device),
                           torch.full((s.num_pages,), sc, device=device))
        self.step = (t(s.cu_q), t(s.kv_lens), t(s.page_table), t(s.q), t(s.qi), t(s.k_new), t(s.v_new),
                     t(s.ki_new))
        self.out = torch.full(s.q.shape, float("nan"), device=device)
        self.lse = torch.full(s.q.shape[:2], float("nan"), device=device)
        self.topk = torch.full((cfg.num_kv_heads, s.q.shape[0], cfg.topk), -7, dtype=torch.int32,
                               device=device)
        self.ws = torch.zeros(plan.workspace_bytes, dtype=torch.uint8, device=device)

    def args(self):
        return (*self.step, self.k, self.v, self.ki, *self.scales, self.out, self.lse, self.topk, self.ws)

    def eager(self, plan):
        """The same step through msa.paged's eager calls (the reference)."""
        cu_q, kv_lens, pt, q, qi, k_new, v_new, ki_new = self.step
        batch = msa.paged.Batch(cu_q, kv_lens, pt)
        cache = msa.paged.Cache(self.k, self.v, self.ki, *self.scales)
        msa.paged.append(plan, batch, k_new, v_new, ki_new, cache)
        msa.paged.run(plan, batch, q, qi, cache, self.out, self.lse, self.topk, self.ws)

    def written(self):
        """Everything a step writes, FP8 caches as their bytes."""
        def bits(x):
            return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x
        return [bits(x) for x in (self.k, self.v, self.ki, self.out, self.lse, self.topk)]


def steps(cfg, device):
    """Two consecutive steps of other lengths (same shapes), each with its own plan."""
    for seed, lengths in ((3, LENGTHS), (4, LONGER)):
        s = Step(cfg, seed=seed, lengths=lengths)
        yield s, msa.paged.plan(cfg, s.q_lens, s.kv_lens, dtype="float32", device=device)


def check_compiled_equals_eager(backend, head_major, fp8, device="cpu", cfg=None):
    cfg = cfg or make_cfg(8, 2)
    compiled = torch.compile(model_step, fullgraph=True, backend=backend)
    for i, (s, plan) in enumerate(steps(cfg, device)):
        want = Inputs(cfg, s, plan, head_major, fp8, device)
        want.eager(plan)
        got = Inputs(cfg, s, plan, head_major, fp8, device)
        with msa.paged.use_plan(plan), torch._dynamo.config.patch(error_on_recompile=i > 0):
            doubled = compiled(*got.args())
        if device == "cuda":
            torch.cuda.synchronize()
        assert torch.isfinite(got.out).all(), "the compiled step did not write out"
        for g, w in zip(got.written(), want.written()):
            assert torch.equal(g, w)
        assert torch.equal(doubled, 2 * want.out)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("head_major", [False, True])
def test_compiled_step_equals_eager_calls(backend, head_major):
    check_compiled_equals_eager(backend, head_major, fp8=False)


@pytest.mark.parametrize("head_major", [False, True])
def test_compiled_step_with_fp8_caches(head_major):
    check_compiled_equals_eager("aot_eager", head_major, fp8=True)


def test_compiled_step_on_cuda():
    if not (torch.cuda.is_available() and msa.cuda_available()):
        pytest.skip("no CUDA device or no CUDA build")
    torch._dynamo.reset()
    # The CUDA backend's head dims are 64 and 128. With B = 16 the two steps' page counts still agree.
    cfg = msa.Config(num_q_heads=8, num_kv_heads=2, head_dim=64, index_head_dim=32, block_size=16, topk=3)
    check_compiled_equals_eager("inductor", head_major=True, fp8=False, device="cuda", cfg=cfg)


def test_ops_outside_use_plan_name_the_plan():
    cfg = make_cfg(8, 2)
    s, plan = next(steps(cfg, "cpu"))
    x = Inputs(cfg, s, plan)
    with pytest.raises(msa.ArgumentError, match="use_plan") as e:
        model_step(*x.args())
    assert e.value.argument == "plan"
    with pytest.raises(msa.ArgumentError) as e:
        with msa.paged.use_plan("not a plan"):
            pass
    assert e.value.argument == "plan"
    with msa.paged.use_plan(plan):  # the scope ends with the block
        assert msa.paged.current_plan() is plan
    assert msa.paged.current_plan() is None
