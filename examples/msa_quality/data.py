"""Synthetic long-context task: multi-key retrieval over records hidden in Markov filler.

One sequence of exactly `length` tokens:

    BOS  filler ... [REC k v END] filler ... [QUERY k _] ... [REC ...] filler ...
         [QUERY k v] x n_queries

- keys and values are tokens of one 128-token alphabet: a key is one token (distinct within a
  sequence), a value one uniform random token. Only attention back to the record can predict a
  value. The question repeats the key and the value follows it, as in the record, so answering is
  finding the record of the key and copying what came after it (an induction head's job);
- filler comes from a fixed sparse second-order Markov chain (each context has 4 successors with
  probabilities 0.55/0.25/0.15/0.05, entropy ~1.1 nats), so the plain LM loss is learnable and
  attention over the filler is not trivial;
- the questions at the end ask for `n_queries` distinct records; the answer token (v after the
  question's key) is the retrieval target; training sequences also hold questions inside the text
  (inline_questions_for), each at a uniform place and about a uniform one of the records before it,
  whose answer is a training target but is not in the text (BLANK stands there): the record stays
  the only place that holds the value, whatever its distance. (With the answers shown, a model
  trained to 99.5% at 32K copied them from the nearest earlier question and found 33% of the
  records at 32K when only the record held the value: README, "Task design".)
- the needle variant puts the first queried record at a chosen depth (0 = start of the filler,
  1 = its end) and asks only for it.

Everything is a pure function of (seed, index): batch `step` of a run is `make_batch(seed, step, ...)`,
so every regime sees the same data in the same order. README ("Task design") says which earlier
designs a dense model failed to learn and why this one is what it is.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

VOCAB_SIZE = 512
PAD, BOS, REC, END, QUERY, EOS, BLANK = range(7)  # BLANK: an inline question's unshown answer
# Keys and values share one alphabet: with keys from their own 192 tokens the dense model learnt
# only to copy the most recent record's value (README, "Task design").
VALUE_BASE, NUM_VALUE_TOKENS = 208, 128
KEY_BASE, NUM_KEY_TOKENS = VALUE_BASE, NUM_VALUE_TOKENS
VALUE_LEN = 1  # value tokens per record
FILLER_BASE = 336
NUM_FILLER = VOCAB_SIZE - FILLER_BASE
WORLD_SEED = 20240601  # the Markov chain is the same for every run and split
_BRANCH_PROBS = np.array([0.55, 0.25, 0.15, 0.05])


def _successors() -> np.ndarray:
    """[NUM_FILLER, CONTEXT_CLASSES, 4]: successors of (last token, class of the token before)."""
    rng = np.random.default_rng(WORLD_SEED)
    return np.stack([np.stack([rng.choice(NUM_FILLER, size=len(_BRANCH_PROBS), replace=False)
                               for _ in range(CONTEXT_CLASSES)]) for _ in range(NUM_FILLER)])


CONTEXT_CLASSES = 4  # the token before the last counts through its index mod 4
_SUCC = _successors()


def filler(rng: np.random.Generator, n: int) -> np.ndarray:
    """n tokens of the Markov chain, started at a uniform state. Second order: a token's successors
    depend on the token before it too (its index mod CONTEXT_CLASSES), so the LM loss rewards a
    head that reads the previous token, the first half of the induction circuit retrieval needs."""
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    branch = rng.choice(len(_BRANCH_PROBS), size=n, p=_BRANCH_PROBS).tolist()
    state, before = int(rng.integers(NUM_FILLER)), int(rng.integers(NUM_FILLER))
    succ = _SUCC.tolist()
    for i in range(n):
        out[i] = state
        state, before = succ[state][before % CONTEXT_CLASSES][branch[i]], state
    return out + FILLER_BASE


def record_len() -> int:
    return VALUE_LEN + 3  # REC k v.. END


def query_len() -> int:
    return VALUE_LEN + 2  # QUERY k v..


def filler_entropy_nats() -> float:
    """Per-token entropy of the filler chain: the LM loss floor on filler tokens."""
    p = _BRANCH_PROBS
    return float(-(p * np.log(p)).sum())


def records_for(length: int, per_1k: float = 4.0) -> int:
    return max(4, int(length * per_1k / 1024))


def inline_questions_for(length: int, per_1k: float = 32.0) -> int:
    """Questions inside a training sequence (besides the final ones): without them a sequence has 8
    answer tokens, and a small model trained on that signal alone never found the records (answer
    loss stuck at ln 128 after 2000 steps at 4K-32K, and after 800 steps at 512 tokens)."""
    return int(length * per_1k / 1024)


def _inline_questions(rng, cuts, n_fill, n_inline):
    """(record, cut) of each inline question: a uniform place (none before the first record), about
    a uniform one of the records before it, so retrieval is practised at every distance."""
    order = np.argsort(cuts, kind="stable")
    sorted_cuts = cuts[order]
    at = rng.integers(0, n_fill + 1, size=n_inline)
    at = np.maximum(at, sorted_cuts[0])  # none before the first record
    before = np.searchsorted(sorted_cuts, at, side="right")
    pick = (rng.random(n_inline) * before).astype(np.int64)
    return order[pick], at


@dataclass
class Example:
    tokens: np.ndarray        # [length] int64
    answer_pos: np.ndarray    # positions of the answer tokens (v1, v2 of every query), ascending
    answer_tok: np.ndarray    # the value each answer position must predict (BLANK in the text
                              # for the inline questions)
    record_pos: np.ndarray    # start position of every queried record, query order
    length: int


def make_example(rng: np.random.Generator, length: int, n_records: Optional[int] = None,
                 n_queries: int = 4, needle_depth: Optional[float] = None,
                 n_inline: int = 0) -> Example:
    n_records = records_for(length) if n_records is None else n_records
    if needle_depth is not None:
        n_queries = 1
    n_queries = min(n_queries, n_records)
    n_fill = length - 1 - record_len() * n_records - query_len() * (n_queries + n_inline)
    if n_fill < 0:
        raise ValueError(f"length {length} too short for {n_records} records")
    if n_records > NUM_KEY_TOKENS:
        raise ValueError(f"{n_records} records need more than {NUM_KEY_TOKENS} distinct keys")
    keys = rng.choice(NUM_KEY_TOKENS, size=n_records, replace=False) + KEY_BASE
    values = rng.integers(NUM_VALUE_TOKENS, size=(n_records, VALUE_LEN)) + VALUE_BASE
    asked = rng.choice(n_records, size=n_queries, replace=False)
    # Insertion points into the filler; the needle (record asked[0]) goes at its depth.
    cuts = rng.integers(0, n_fill + 1, size=n_records)
    if needle_depth is not None:
        cuts[asked[0]] = int(round(needle_depth * n_fill))
    inline_rec, inline_cut = _inline_questions(rng, cuts, n_fill, n_inline)
    # Events in filler order; at one cut a record comes before the questions about it.
    events = sorted([(int(cuts[r]), 0, r) for r in range(n_records)] +
                    [(int(c), 1, int(r)) for c, r in zip(inline_cut, inline_rec)])
    fill = filler(rng, n_fill)
    parts: List[np.ndarray] = [np.array([BOS])]
    start = {}
    answers, answer_tok = [], []
    pos, prev = 1, 0

    def question(r, shown):
        nonlocal pos
        parts.append(np.array([QUERY, keys[r], *(values[r] if shown else [BLANK] * VALUE_LEN)]))
        answers.extend(range(pos + 2, pos + 2 + VALUE_LEN))
        answer_tok.extend(values[r].tolist())
        pos += query_len()

    for c, is_question, r in events:
        parts.append(fill[prev:c])
        pos += c - prev
        prev = c
        if is_question:
            question(r, shown=False)
            continue
        start[r] = pos
        parts.append(np.array([REC, keys[r], *values[r], END]))
        pos += record_len()
    parts.append(fill[prev:])
    pos += n_fill - prev
    for r in asked.tolist():
        question(r, shown=True)
    tokens = np.concatenate(parts).astype(np.int64)
    assert tokens.shape[0] == length == pos
    return Example(tokens, np.array(answers, dtype=np.int64), np.array(answer_tok, dtype=np.int64),
                   np.array([start[r] for r in asked.tolist()], dtype=np.int64), length)


@dataclass
class Batch:
    tokens: np.ndarray        # [total] int64, sequences packed back to back
    cu_seqlens: np.ndarray    # [n+1] int32
    answer_pos: np.ndarray    # packed positions of answer tokens
    answer_tok: np.ndarray    # what each of them must predict
    answer_seq: np.ndarray    # which sequence each answer belongs to
    max_seqlen: int


def pack(examples: Sequence[Example]) -> Batch:
    lens = [e.length for e in examples]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ans = np.concatenate([e.answer_pos + cu[i] for i, e in enumerate(examples)])
    seq = np.concatenate([np.full(len(e.answer_pos), i) for i, e in enumerate(examples)])
    return Batch(np.concatenate([e.tokens for e in examples]), cu, ans.astype(np.int64),
                 np.concatenate([e.answer_tok for e in examples]), seq.astype(np.int64), max(lens))


def train_length(step: int, lengths: Sequence[int]) -> int:
    return lengths[step % len(lengths)]


def make_batch(seed: int, step: int, lengths: Sequence[int], batch: int,
               inline_per_1k: float = 32.0) -> Batch:
    """Training batch `step`: `batch * max(lengths)` tokens, all sequences of this step's length
    (lengths cycle step by step), so every step trains on the same number of tokens."""
    length = train_length(step, lengths)
    n = max(1, batch * max(lengths) // length)
    rng = np.random.default_rng([seed, step])
    return pack([make_example(rng, length, n_inline=inline_questions_for(length, inline_per_1k))
                 for _ in range(n)])


def make_eval_batch(seed: int, length: int, n: int, needle_depth: Optional[float] = None,
                    n_queries: int = 4) -> Batch:
    tag = 1_000_000 if needle_depth is None else int(round(needle_depth * 1000))
    rng = np.random.default_rng([seed, length, tag, 7])  # 4 words: apart from training's [seed, step]
    return pack([make_example(rng, length, n_queries=n_queries, needle_depth=needle_depth)
                 for _ in range(n)])
