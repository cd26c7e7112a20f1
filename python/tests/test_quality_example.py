"""examples/msa_quality (issue 6's quality study) end to end at tiny size on the CPU: the task
generator, the KV-cache decode against the full forward, the MSA-CPT conversion, and report.py
(train the three regimes, evaluate, write the report) for a few steps. Skipped without torch."""

import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples",
                    "msa_quality")
sys.path.insert(0, os.path.abspath(HERE))

import data  # noqa: E402
import model as qm  # noqa: E402
import report  # noqa: E402

TINY = dict(vocab_size=data.VOCAB_SIZE, d_model=32, n_layers=2, n_q_heads=8, n_kv_heads=2,
            head_dim=16, index_head_dim=16, block_size=16, topk=4, mlp_hidden=64, rotary_dim=8,
            index_rotary_dim=8)


def test_generator_is_seeded_and_places_the_needle():
    a = data.make_batch(3, 5, [256, 512], 2)
    b = data.make_batch(3, 5, [256, 512], 2)
    assert np.array_equal(a.tokens, b.tokens) and a.tokens.shape[0] == 1024
    assert a.tokens.max() < data.VOCAB_SIZE
    # Training sequences ask inline questions too: every answer is the value of an earlier record,
    # not mostly the most recent one (a model that copies the last record's value must fail), and
    # the record is the only place before the question where the key is followed by the value
    # (inline answers are BLANK in the text, so no earlier question gives it away).
    n_val = data.VALUE_LEN
    most_recent = hidden = 0
    for i in range(len(a.answer_pos) // n_val):
        p = int(a.answer_pos[n_val * i])
        key, value = a.tokens[p - 1], a.answer_tok[n_val * i:n_val * (i + 1)]
        seq_start = int(a.cu_seqlens[a.answer_seq[n_val * i]])
        recs = [j for j in range(seq_start, p - 1) if a.tokens[j] == data.REC and a.tokens[j + 1] == key]
        assert len(recs) == 1 and np.array_equal(a.tokens[recs[0] + 2:recs[0] + 2 + n_val], value)
        shown = [j for j in range(seq_start, p - 1)
                 if a.tokens[j] == key and np.array_equal(a.tokens[j + 1:j + 1 + n_val], value)]
        assert shown == [recs[0] + 1]
        hidden += bool((a.tokens[p:p + n_val] == data.BLANK).all())
        later = [j for j in range(recs[0] + 1, p - 1) if a.tokens[j] == data.REC]
        most_recent += not later
    n_questions = len(a.answer_pos) // n_val
    assert n_questions > 2 * 4  # more questions than the 4 final ones per sequence
    assert hidden == n_questions - 2 * 4  # all but the final ones
    assert most_recent < 0.8 * n_questions
    for depth in (0.0, 0.5, 1.0):
        ex = data.make_example(np.random.default_rng(1), 512, needle_depth=depth)
        assert ex.tokens.shape[0] == 512 and len(ex.answer_pos) == n_val
        r = int(ex.record_pos[0])
        rec, q = ex.tokens[r:r + data.record_len()], ex.tokens[-data.query_len():]
        assert rec[0] == data.REC and q[0] == data.QUERY
        assert rec[1] == q[1] and np.array_equal(rec[2:2 + n_val], q[2:2 + n_val])  # key, then its value
        n_fill = 512 - 1 - data.record_len() * data.records_for(512) - data.query_len()
        assert abs((r - 1) / n_fill - depth) < 0.2  # other records before it shift it a little


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_kv_cache_decode_matches_forward(mode):
    torch.manual_seed(0)
    m = qm.Decoder(qm.ModelConfig(**TINY), mode).eval()
    tokens = torch.from_numpy(data.make_batch(0, 0, [200], 1).tokens)
    cu = torch.tensor([0, 200], dtype=torch.int32)
    with torch.no_grad():
        full, _ = m(tokens, cu, 200)
    cache = qm.KVCache(m, 200, "cpu", torch.float32)
    part = [qm.extend(m, tokens[:150], cache)]
    part += [qm.extend(m, tokens[i:i + 1], cache) for i in range(150, 200)]  # decode, 1 by 1
    torch.testing.assert_close(torch.cat(part), full, rtol=1e-4, atol=1e-4)


def test_cpt_conversion_keeps_the_dense_model():
    torch.manual_seed(0)
    m = qm.Decoder(qm.ModelConfig(**TINY), "dense").eval()
    b = data.make_batch(0, 0, [256], 1)
    tokens, cu = torch.from_numpy(b.tokens), torch.from_numpy(b.cu_seqlens)
    with torch.no_grad():
        dense, _ = m(tokens, cu, 256)
        q_weight = m.blocks[0].attn.q_proj.weight
        m.convert_to_msa("warmup")
        assert m.blocks[0].attn.q_proj.weight is q_weight  # shared, not copied
        warm, kl = m(tokens, cu, 256)
    torch.testing.assert_close(warm, dense)  # warmup = dense main branch
    assert kl.item() > 0


def test_report_pipeline_end_to_end(tmp_path):
    out, rdir = tmp_path / "runs", tmp_path / "report"
    common = ["--preset", "tiny", "--d-model", "32", "--mlp-hidden", "64", "--device", "cpu",
              "--out", str(out)]
    report.main(common + [
        "--steps", "3", "--seq-len", "256,384", "--batch", "1", "--log-every", "1",
        "--save-every", "1", "--lengths", "256,384", "--n-eval", "2", "--needle-lengths", "384",
        "--depths", "0,1", "--n-needle", "1", "--recall-lengths", "256", "--decode-lengths", "256",
        "--gen-tokens", "3", "--report-dir", str(rdir)])
    for r in ("dense", "pt", "cpt"):
        log = [json.loads(l) for l in open(out / r / "train.jsonl")]
        assert all(np.isfinite(x["loss"]) for x in log)
        assert json.load(open(out / r / "final" / "config.json"))["regime"] == r
    modes = [json.loads(l)["mode"] for l in open(out / "pt" / "train.jsonl")]
    assert modes == ["warmup", "sparse", "sparse"]  # pt warmup = max(1, 3 // 10)
    cpt = [json.loads(l) for l in open(out / "cpt" / "train.jsonl")]
    dense = [json.loads(l) for l in open(out / "dense" / "train.jsonl")]
    assert [x["step"] for x in cpt] == [2] and cpt[0]["mode"] == "warmup"
    # Converted at step 2: the same data and the same dense main branch as the dense run's step 2.
    assert abs(cpt[0]["lm_loss"] - dense[2]["lm_loss"]) < 1e-4
    ev = json.load(open(out / "eval" / "pt.json"))
    assert set(ev["retrieval"]) == {"256", "384"}
    assert all(0.0 <= ev["needle"][d]["384"]["accuracy"] <= 1.0 for d in ev["needle"])
    for layer in ev["index_recall"]["256"]["layers"]:
        assert layer["queries"] > 0 and 0.0 < layer["coverage"] <= layer["oracle"] + 1e-6 <= 1.0 + 1e-5
    assert ev["decode"]["256"]["per_token_s"] > 0
    text = (rdir / "REPORT.md").read_text()
    assert "MSA-CPT" in text and "Index recall" in text
    for png in ("loss_curves.png", "retrieval.png", "needle.png"):
        assert (rdir / png).stat().st_size > 0
