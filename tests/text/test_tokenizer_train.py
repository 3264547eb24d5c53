"""`python -m lwm.tokenizer train` and lwm.text.tokenizer's vocabulary-size rule: the corpus's characters are
counted as sentencepiece counts them, so the smallest vocab_size we name is the one sentencepiece accepts
(one less is refused by sentencepiece itself: the control), and 'auto' coverage makes a too-small size work."""
import io
import json

import pytest
import sentencepiece as spm

from lwm import tokenizer as entry
from lwm.cli.command import cli
from lwm.text.tokenizer import (META_PIECES, character_counts, choose_coverage, load_tokenizer, read_texts,
                                smallest_vocab_size)

# Three licence-like files (the three licence files had 274 distinct characters beyond the 259 special
# and byte pieces): ASCII prose, names in 40 accented letters, and 200 other letters once each.
LICENCE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
           "associated documentation files (the \"Software\"), to deal in the Software without restriction. "
           "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND; Copyright (c) 2024 {name}.\n\n")
RARE = "".join(chr(c) for c in list(range(0xC0, 0x180)) + list(range(0x391, 0x3C9)) + list(range(0x410, 0x44F)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = []
    for k in range(3):
        path = d / f"LICENSE{k}.txt"
        path.write_text("".join(LICENCE.format(name=RARE[i % 40] * 2 + f" {i}") for i in range(k, 900, 3))
                        + RARE[40 + k:240:3], encoding="utf-8")
        files.append(str(path))
    return files


def raw_sentencepiece_accepts(texts, vocab_size, coverage):
    """sentencepiece's own verdict, without our check in front."""
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=io.BytesIO(), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, hard_vocab_limit=False, max_sentence_length=1 << 16,
            num_threads=1, minloglevel=2)
        return True
    except RuntimeError as e:
        assert "Vocabulary size is smaller than required_chars" in str(e)
        return False


def test_smallest_vocab_size_is_sentencepieces(corpus):
    texts = list(read_texts(corpus))
    counts = character_counts(texts)
    need = smallest_vocab_size(counts, 1.0)
    assert need > 512                                   # the scripts' old size fails at full coverage
    assert raw_sentencepiece_accepts(texts, need, 1.0)
    assert not raw_sentencepiece_accepts(texts, need - 1, 1.0)         # control: one less is refused
    low = smallest_vocab_size(counts, 0.9995)
    assert low < need and raw_sentencepiece_accepts(texts, low, 0.9995)
    assert not raw_sentencepiece_accepts(texts, low - 1, 0.9995)


def test_licence_files_train_at_512_and_encode(corpus, tmp_path, capsys):
    out = tmp_path / "tok.model"
    line = entry.main(["train", f"--input={','.join(corpus)}", f"--output={out}", "--vocab_size=512"])
    assert "512 pieces" in line and "character coverage 0.99" in line
    tok = load_tokenizer(str(out))
    text = "granted " + RARE[:5] + RARE[200:205]                       # rare characters fall back to bytes, losslessly
    assert tok.decode(tok.encode(text)) == text
    assert tok.bos_id == 1 and tok.eos_id == 2


def test_too_small_is_one_line_naming_the_smallest(corpus, tmp_path, capsys):
    texts = list(read_texts(corpus))
    counts = character_counts(texts)
    floor = smallest_vocab_size(counts, 0.9995)
    argv = ["train", f"--input={','.join(corpus)}", f"--output={tmp_path}/t.model"]
    assert cli("lwm.tokenizer", entry.main, entry.get_default_config, "", argv + [f"--vocab_size={floor - 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"the smallest that works is {floor}" in err and f"--vocab_size={floor - 1}" in err
    assert not (tmp_path / "t.model").exists()
    # control: the size it names works
    assert cli("lwm.tokenizer", entry.main, entry.get_default_config, "", argv + [f"--vocab_size={floor}"]) == 0
    full = smallest_vocab_size(counts, 1.0)
    assert cli("lwm.tokenizer", entry.main, entry.get_default_config, "",
               argv + ["--vocab_size=512", "--character_coverage=1"]) == 2
    assert f"the smallest that works is {full}" in capsys.readouterr().err
    assert choose_coverage(counts, full) == 1.0 and choose_coverage(counts, full - 1) < 1.0


def test_jsonl_field_and_bad_lines(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": f"line {i} of my own corpus", "text": "X"}) + "\n"
                            for i in range(50)))
    assert list(read_texts([str(data)], "body"))[0] == "line 0 of my own corpus"
    tok = entry.main(["train", f"--input={data}", "--field=body", f"--output={tmp_path}/t.model",
                      "--vocab_size=300"])
    assert "300 pieces" in tok or "pieces (asked 300)" in tok
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        list(read_texts([str(bad)]))
    with pytest.raises(ValueError, match="matches no file"):
        entry.main(["train", f"--input={tmp_path}/missing*.jsonl", f"--output={tmp_path}/x.model"])
    assert META_PIECES == 259
