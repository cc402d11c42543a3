"""The vocabulary decides how text is written: case, alphabet, punctuation, delimiter, specials,
the tokenizer; unspellable characters are named up front. Oracles are hand-written spellings."""

from __future__ import annotations

import logging
import string

import pytest

from recipes.data.readers import Utterance
from recipes.evaluation.asr import greedy_ctc_decode, wer_cer
from recipes.speech.text import TextCodec, check_transcripts

UPPER = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list(string.ascii_uppercase) + ["'"]
LOWER = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list(string.ascii_lowercase) + ["'"]
CYRILLIC = ["[PAD]", "[UNK]", "|"] + [chr(c) for c in range(0x430, 0x450)] + ["ё"]
GERMAN = ["<pad>", "<unk>", " "] + list("abcdefghijklmnopqrstuvwxyzäöüß") + [",", ".", "?"]
MIXED = ["<pad>", "<unk>", "|"] + list("abcABC")


def _codec(vocab, delimiter="|", tokenizer=None):
    return TextCodec(vocab, 0, delimiter, tokenizer)


@pytest.mark.parametrize("vocab, text, expected", [
    (UPPER, "  Hello,  world! It's fine-ish. ", "HELLO WORLD IT'S FINE ISH"),
    (UPPER, "it\u2019s", "IT'S"),  # typographic apostrophe: the vocabulary's "'"
    (LOWER, "WHERE IS A SNOW", "where is a snow"),
    (LOWER, "Élan 42", "élan 42"),  # letters / digits it cannot spell stay (counted as <unk>)
    (CYRILLIC, "Привет, МИР!", "привет мир"),
    (GERMAN, "Straße, Ärger? Ja.", "straße, ärger? ja."),  # punctuation tokens it has are kept
    (GERMAN, "Gru\u0308n", "grün"),  # decomposed umlaut: NFC first
    (MIXED, "aB Ca", "aB Ca"),  # both cases in the vocabulary: case is kept
])
def test_canonical_spelling(vocab, text, expected):
    assert _codec(vocab, " " if " " in vocab else "|").canonical(text) == expected


def test_case_policy_from_the_letters():
    assert [_codec(v).case for v in (UPPER, LOWER, CYRILLIC, MIXED)] == ["upper", "lower", "lower", "keep"]
    assert _codec(["<pad>", "|", "中", "文"]).case == "keep"  # uncased script


def test_encode_by_hand_with_delimiters_and_unknowns():
    lower = _codec(LOWER)
    assert [LOWER[i] for i in lower.encode("AB c#d")] == ["a", "b", "|", "c", "|", "d"]
    assert [LOWER[i] for i in lower.encode("aé")] == ["a", "<unk>"]
    german = _codec(GERMAN, " ")
    assert [GERMAN[i] for i in german.encode("Ja, gut")] == ["j", "a", ",", " ", "g", "u", "t"]
    cyr = _codec(CYRILLIC)
    assert [CYRILLIC[i] for i in cyr.encode("Да x")] == ["д", "а", "|", "[UNK]"]
    no_unk = _codec(["<pad>", "|", "a", "b"])
    assert no_unk.encode("a x b") == [2, 1, 1, 3]  # no unknown token: the letter is left out


def test_tokenizer_writes_the_targets(tmp_path):
    import json

    from transformers import Wav2Vec2CTCTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(UPPER)}))
    tok = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), do_lower_case=True)  # upper-cases input
    codec = _codec(UPPER, tokenizer=tok)
    assert [UPPER[i] for i in codec.encode("it's ok")] == list("IT'S") + ["|"] + list("OK")
    # a tokenizer that upper-cases text for a lowercase vocabulary would write only <unk>: refused
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(LOWER)}))
    bad = _codec(LOWER, tokenizer=Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), do_lower_case=True))
    assert [LOWER[i] for i in bad.encode("OK")] == ["o", "k"]


def test_decode_drops_bracket_and_angle_specials():
    ids = [3, 0, 4, 0, 5, 1, 0, 2, 3]  # [UNK]-like ids and a delimiter between words
    vocab = ["[PAD]", "[UNK]", "|", "а", "б", "в"]
    assert greedy_ctc_decode(__import__("torch").tensor(ids), vocab, 0, "|") == ["абв а"]


def test_wer_is_invariant_under_relabelling():
    refs, hyps = ["THE CAT SAT", "A DOG"], ["THE CAT SAD", "A DOG DOG"]
    upper = wer_cer(refs, hyps, codec=_codec(UPPER))
    assert upper == wer_cer(refs, [h.lower() for h in hyps], codec=_codec(LOWER))  # refs untouched
    table = {c: chr(0x430 + i) for i, c in enumerate(string.ascii_uppercase)}
    mapped = _codec(["[PAD]", "[UNK]", "|"] + list(table.values()))
    relabel = lambda t: "".join(table.get(c, c) for c in t)  # noqa: E731
    assert upper == wer_cer([relabel(r) for r in refs], [relabel(h) for h in hyps], codec=mapped)
    assert upper == pytest.approx((100 * 2 / 5, 100 * 5 / 16))  # a substitution and an insertion


def test_unspellable_characters_are_named_with_file_and_line(caplog):
    utts = [Utterance("a", None, "HELLO 42", where="dev.tsv:3"), Utterance("b", None, "OK", where="dev.tsv:4"),
            Utterance("c", None, "4 ÉTÉ", where="dev.tsv:9")]
    with caplog.at_level(logging.WARNING):
        counts = check_transcripts(_codec(UPPER), utts)
    assert counts == {"4": 2, "2": 1, "É": 2}
    text = caplog.text
    assert "'4' (U+0034)" in text and "dev.tsv:3, dev.tsv:9" in text and "counted as <unk>" in text
    assert "dev.tsv:4" not in text


def test_an_xlsr_style_vocabulary_runs_every_search_and_names_what_it_cannot_spell(tmp_path, caplog):
    """A checkpoint like the multilingual XLSR fine-tunes: [PAD]/[UNK] specials, lowercase letters
    beyond A-Z, transcripts in any case with punctuation and digits. Every search runs; characters
    the vocabulary lacks are named (file:line) before any search starts."""
    import json

    import numpy as np
    import soundfile as sf

    from recipes.cli import main
    from recipes.speech.models import random_model, save_model

    model = tmp_path / "model"
    save_model(random_model("tiny", seed=5), model)
    vocab = ["[PAD]", "[UNK]", "|"] + list("abcdefghijklmnopqrstuvwxyzäöé")  # 32 tokens, as the head
    (model / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (model / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "[PAD]", "unk_token": "[UNK]", "word_delimiter_token": "|", "do_lower_case": False,
        "tokenizer_class": "Wav2Vec2CTCTokenizer"}))
    rng = np.random.default_rng(0)
    texts = ["Größe, Ähre!", "ÉTÉ 42 ok", "hello world"]
    for i in range(3):
        sf.write(tmp_path / f"u{i}.flac", rng.standard_normal(5000 + 700 * i).astype("float32") * 0.1, 16000)
    (tmp_path / "set.tsv").write_text("".join(f"u{i}.flac\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    data = str(tmp_path / "set.tsv")
    common = ["--model", str(model), "--calib", data, "--dev", data, "--grid", "0,0.1", "--num-bins", "128"]
    with caplog.at_level(logging.WARNING):
        assert main(["quantize", *common, "--budget-bits", "6", "--mixed-score", "ctc",
                     "--out", str(tmp_path / "m")]) == 0
    assert "'ß' (U+00DF)" in caplog.text and "set.tsv:1" in caplog.text and "counted as [UNK]" in caplog.text
    assert "'4' (U+0034)" in caplog.text and "set.tsv:2" in caplog.text
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["score"] == "ctc" and report["meta"]["dev"]["fp32"]["words"] == 7  # größe ähre été 42 ok hello world
    assert main(["compare", *common, "--test", data, "--bits", "8", "--budgets", "6",
                 "--out", str(tmp_path / "c")]) == 0
