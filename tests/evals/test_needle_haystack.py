"""The needle haystack handles any text: '.'-separated English is placed exactly as by the original rule (a
frozen copy of the original functions is the reference), Chinese ('。', with a tokenizer that knows the
characters and with one that spells them in bytes) and code (line ends) land at the requested depth on a
sentence boundary of that script, a text with no boundary at all falls back to whole-character token
boundaries (warned once), and no prompt holds U+FFFD (a cut multi-byte character)."""
import json
import random
import warnings

import pytest

from lwm.evals import needle
from lwm.text.tokenizer import train_sentencepiece

ZH_CHARS = ("我们你他是的了在有和人这中大为上个国不以到说时要就出会可也对生能而子那得于着下自之年过发后作里用道行所然家种"
            "事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实日军者意无力它与长把机十"
            "民第公此已工使情明性知全三又关点正业外将两高间由问很最重并物手应战向头文体政美相见被利什二等产或新己制身果加西")
WORDS = "time market people idea startup money work company reason question answer city river house world".split()
NEEDLE = "\nThe special magic Paris number is: 1234567\n"


def english(seed=0, n=200):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()
        out.append(words + rng.choice([". ", ". ", ". ", "? ", "! ", ".\n\n", " (3.5 or e.g. os.path). "]))
    return "".join(out)


def chinese(seed=0, n=200):
    rng = random.Random(seed)
    return "".join("".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(8, 25))) + rng.choice("。。。！？")
                   for _ in range(n))


def code(n=300):
    return "\n".join(f"def f{i}(x):\n    return x + {i} * y_{i % 7}" for i in range(n)) + "\n"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    english_only = train_sentencepiece([english(s) for s in range(3)] + [NEEDLE], str(d / "en.model"), 400)
    with_chinese = train_sentencepiece([chinese(s) for s in range(3)] + [english(0), NEEDLE, code(50)],
                                       str(d / "zh.model"), 1000)
    return english_only, with_chinese


# The original's placement, frozen here as the reference (lwm/evals/needle.py before the any-script change).
def original_insertion_point(haystack, depth_percent, period_ids):
    n = len(haystack)
    if depth_percent >= 100:
        return n
    point = int(n * depth_percent / 100)
    while point > 0 and haystack[point - 1] not in period_ids:
        point -= 1
    return point


def original_insert_needles(haystack, needles, context_length, period_ids, buffer):
    budget = context_length - buffer - sum(len(t) for t, _ in needles)
    base = list(haystack[:budget])
    points = [original_insertion_point(base, depth, period_ids) for _, depth in needles]
    order = sorted(range(len(needles)), key=lambda i: (points[i], i))
    tokens, starts, prev = [], [0] * len(needles), 0
    for i in order:
        tokens.extend(base[prev:points[i]])
        starts[i] = len(tokens)
        tokens.extend(needles[i][0])
        prev = points[i]
    tokens.extend(base[prev:])
    return tokens, starts


def test_english_is_placed_as_by_the_original(tokenizers, tmp_path):
    tok = tokenizers[0]
    ends = needle.period_token_ids(tok)
    assert ends == frozenset(i for i in range(tok.vocab_size) if tok.decode([i]).rstrip().endswith("."))
    hay = tok.encode(english(7, 400))
    rng = random.Random(0)
    checked = 0
    for length in (120, 300, 1000, 2500):
        for depth in range(0, 101, 5):
            for start in (0, rng.randrange(0, 500)):
                pieces = [(tok.encode(NEEDLE), depth), (tok.encode(" 42 "), rng.uniform(0, 100))]
                got = needle.insert_needles(hay[start:], pieces, length, ends, buffer=20)
                assert got == original_insert_needles(hay[start:], pieces, length, ends, buffer=20)
                checked += 1
    assert checked == 4 * 21 * 2
    # And the eval scripts' trials (single and multi needle) are unchanged, prompt for prompt.
    path = tmp_path / "hay.jsonl"
    path.write_text("".join(json.dumps({"text": english(s, 300)}) + "\n" for s in range(4)))
    hays = needle.read_haystacks(str(path), 2, 1500, tok)
    trials = needle.single_needle_trials(hays, tok, [500, 1500], [0, 30, 70, 100], random.Random(3), buffer=50)
    for t in trials:
        n_tokens = needle.encode_needle(tok, t["city"], t["answer"])
        ctx, starts = original_insert_needles(hays[t["seed"]], [(n_tokens, t["depth_percent"])],
                                              t["context_length"], set(ends), 50)
        assert t["prompt"] == needle.build_prompt(tok, ctx, needle.QUESTION.format(city=t["city"]))
        assert t["needle_token_index"] == starts[0]


@pytest.mark.parametrize("which", [0, 1], ids=["bytes", "chinese_vocab"])
def test_chinese_needles_land_at_depth_after_a_full_stop(tokenizers, which):
    tok = tokenizers[which]
    ends = needle.period_token_ids(tok)
    hay = tok.encode(chinese(5, 400))
    needle_tokens = tok.encode(NEEDLE)
    old_zero = 0
    for length in (300, 1000, 2000):
        for depth in (10, 25, 50, 75, 90):
            ctx, (start,) = needle.insert_needles(hay, [(needle_tokens, depth)], length, ends, buffer=20)
            base = ctx[:start] + ctx[start + len(needle_tokens):]
            text = tok.decode(ctx)
            assert "\ufffd" not in text
            before = tok.decode(ctx[:start])
            assert start == 0 or before.endswith(("。", "！", "？")), (length, depth, before[-5:])
            # within one sentence (<= 26 characters, <= 3 byte tokens each) before the requested depth
            assert 0 <= depth / 100 * len(base) - start <= 80, (length, depth, start, len(base))
            old_ctx, (old_start,) = original_insert_needles(hay, [(needle_tokens, depth)], length, ends, 20)
            old_zero += old_start == 0
    assert old_zero == 15 or which == 1       # the original put every one of them at token 0 (byte tokens)


def test_code_needles_land_at_line_ends(tokenizers):
    for tok in tokenizers:
        ends = needle.period_token_ids(tok)
        hay = tok.encode(code())
        for depth in (10, 50, 90):
            ctx, (start,) = needle.insert_needles(hay, [(tok.encode(NEEDLE), depth)], 1000, ends, buffer=20)
            assert tok.decode(ctx[:start]).endswith("\n")
            assert 0 <= depth / 100 * (len(ctx) - len(tok.encode(NEEDLE))) - start <= 20


def test_cuts_never_split_a_character(tokenizers):
    tok = tokenizers[0]                       # Chinese as byte pieces: every cut could split a character
    ends = needle.period_token_ids(tok)
    hay = tok.encode(chinese(9, 300))
    broken_before = 0
    rng = random.Random(1)
    for trial in range(40):
        start, length = rng.randrange(0, 200), rng.randrange(100, 1500)
        pieces = [(tok.encode(NEEDLE), rng.uniform(0, 100)), (tok.encode(" 77 "), rng.uniform(0, 100))]
        ctx, _ = needle.insert_needles(hay[start:], pieces, length, ends, buffer=10)
        prompt = needle.build_prompt(tok, ctx, "What is the special magic Paris number?")
        assert "\ufffd" not in tok.decode(prompt)
        old, _ = original_insert_needles(hay[start:], pieces, length, ends, 10)
        broken_before += "\ufffd" in tok.decode(old)
    assert broken_before >= 10                # the original left broken characters in many of these prompts


def test_no_boundary_falls_back_to_whole_characters_and_says_so_once(tokenizers):
    tok = tokenizers[0]
    ends = needle.period_token_ids(tok)
    hay = tok.encode("".join(random.Random(2).choice(ZH_CHARS) for _ in range(900)))   # no stop at all
    needle._WARNED.discard("token")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for depth in (20, 50, 80):
            ctx, (start,) = needle.insert_needles(hay, [(tok.encode(NEEDLE), depth)], 1500, ends, buffer=10)
            base_len = len(ctx) - len(tok.encode(NEEDLE))
            assert 0 <= depth / 100 * base_len - start <= 4 and "\ufffd" not in tok.decode(ctx)
    assert len([w for w in caught if "no sentence ends" in str(w.message)]) == 1


def test_sentence_boundaries_worked_example():
    class Tok:                                 # 9 = '.', 8 = '。', 7 = a word
        vocab_size = 10

        def decode(self, ids):
            return "".join({9: ".", 8: "。", 7: "字"}.get(i, "x") for i in ids)

    ends = needle.period_token_ids(Tok())
    assert ends == {9} and ends.other == {8}
    assert needle.sentence_boundaries([7, 8, 7, 8, 7], ends) == ("other", [2, 4])
    assert needle.sentence_boundaries([7, 9, 7, 8, 7], {9}) == ("period", [2])
