"""Log-probabilities in OpenAI's response shapes, from the engine's `TokenLogprobs` rows.

    completion_logprobs(tokenizer, ids, rows, k, offset, first_null)  -> {tokens, token_logprobs, top_logprobs,
                                                                          text_offset} (/v1/completions)
    chat_logprobs(tokenizer, ids, rows, k)                            -> {content: [{token, logprob, bytes,
                                                                          top_logprobs}]} (chat)
    merge_completion(a, b)                                            the echoed prompt's entries, then the answer's

A row is (logprob, top ids (K,), top log-probabilities (K,)) of one token (`lwm.serve.jobs.Job.token_logprobs`,
or one position of `lwm.inference.engine.Engine.score`); `k` of the K alternatives are returned. The values
are the engine's (`lwm.inference.engine.token_logprobs`: the model's log-softmax over the ids the tokenizer can
decode, before temperature / top-k / top-p), in natural log.

A token's text is what it adds to the text of the tokens before it (a window of WINDOW tokens: sentencepiece
writes a word's leading space only after another piece, so a token is never decoded alone); the first token of
a sequence is decoded alone, as the answer's text is. `text_offset` counts characters of the decoded text from
`offset` (the echoed prompt's length for an answer), so it indexes the returned text whenever the prompt's text
survives the tokenizer's round trip (decode(encode(s)) == s).
"""
from __future__ import annotations

from typing import Optional, Sequence

WINDOW = 8


def _texts(tokenizer, ids: Sequence[int], i: int, candidates: Sequence[int]) -> list[str]:
    """The text each id of `candidates` adds after ids[:i] (decoded over the last WINDOW of them)."""
    window = [int(x) for x in ids[max(0, i - WINDOW):i]]
    if not window:
        return [tokenizer.decode([int(c)]) for c in candidates]
    head = tokenizer.decode(window)
    return [tokenizer.decode(window + [int(c)])[len(head):] for c in candidates]


def _alternatives(tokenizer, ids, i: int, row, k: int) -> list[tuple[str, float]]:
    if k <= 0:
        return []
    top_ids, top_lp = list(row[1][:k]), [float(x) for x in row[2][:k]]
    return list(zip(_texts(tokenizer, ids, i, top_ids), top_lp))


def completion_logprobs(tokenizer, ids: Sequence[int], rows: Sequence, k: int, offset: int = 0,
                        first_null: bool = False) -> dict:
    """OpenAI's completions `logprobs` object for tokens `ids` (rows: one per id, or with first_null one per
    id after the first, whose logprob and alternatives are null: an echoed prompt's first token has no
    context). k: alternatives per token (`logprobs` of the request). offset: text_offset of ids[0]."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for i, tid in enumerate(ids):
        text = _texts(tokenizer, ids, i, [tid])[0]
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
        row = None if first_null and i == 0 else rows[i - 1 if first_null else i]
        if row is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(float(row[0]))
            top: dict = {}
            for text_, lp in _alternatives(tokenizer, ids, i, row, k):
                top.setdefault(text_, lp)          # two ids of one text (byte pieces): the likelier one
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion(a: Optional[dict], b: Optional[dict]) -> Optional[dict]:
    """The entries of `a` (an echoed prompt), then those of `b` (the answer)."""
    if a is None or b is None:
        return a or b
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(tokenizer, ids: Sequence[int], rows: Sequence, k: int) -> dict:
    """OpenAI's chat `logprobs` object: per answer token its text, logprob, UTF-8 bytes and k alternatives."""
    content = []
    for i, tid in enumerate(ids):
        text = _texts(tokenizer, ids, i, [tid])[0]
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
               for t, lp in _alternatives(tokenizer, ids, i, rows[i], k)]
        content.append({"token": text, "logprob": float(rows[i][0]), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": top})
    return {"content": content}
