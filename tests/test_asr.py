"""Greedy CTC decoding on hand-made logits and WER/CER against jiwer and hand counts."""

from types import SimpleNamespace

import jiwer
import pytest
import torch

from recipes.data.readers import Batch
from recipes.evaluation.asr import evaluate, greedy_ctc_decode, normalize_text, wer_cer

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C", "'"]
ID = {t: i for i, t in enumerate(VOCAB)}


def ids(seq: str):
    """'A A _ B |' -> ids; '_' is the blank."""
    return [ID["<pad>"] if t == "_" else ID[t] for t in seq.split()]


def one_hot(seq: str) -> torch.Tensor:
    x = torch.full((len(ids(seq)), len(VOCAB)), -5.0)
    x[torch.arange(len(ids(seq))), torch.tensor(ids(seq))] = 5.0
    return x


def decode(x, **kw):
    return greedy_ctc_decode(x, VOCAB, blank_id=0, word_delimiter="|", **kw)


def test_repeats_collapse_but_blank_separates():
    assert decode(torch.tensor(ids("A A A _ A B B _ _ C"))) == ["AABC"]


def test_delimiter_becomes_single_space_and_is_stripped():
    seq = "| | A B | _ | C ' A | |"
    assert decode(torch.tensor(ids(seq))) == ["AB C'A"]


def test_specials_dropped():
    assert decode(torch.tensor(ids("<s> A <unk> B </s>"))) == ["AB"]


def test_logits_batch_with_output_lengths():
    a, b = one_hot("A _ A | B"), one_hot("C C _ _ _")
    b[2:] = one_hot("A B C")  # junk in padding frames that must be ignored
    logits = torch.stack([a, b])
    assert decode(logits) == ["AA B", "CABC"]
    assert decode(logits, output_lengths=torch.tensor([5, 2])) == ["AA B", "C"]


def test_single_utterance_logits():
    assert decode(one_hot("B _ B")) == ["BB"]


def test_all_blank_gives_empty_string():
    assert decode(torch.tensor(ids("_ _ _"))) == [""]


def test_normalize_text():
    assert normalize_text("  Hello,   world! It's  fine-ish. ") == "HELLO WORLD IT'S FINE ISH"


PAIRS = [
    (["THE CAT SAT", "ON THE MAT"], ["THE CAT SAT DOWN", "ON MAT"]),
    (["A B C D", "E F"], ["A X C", "E F G"]),
    (["HELLO WORLD"], ["HELO WORD"]),
]


@pytest.mark.parametrize("refs,hyps", PAIRS)
def test_wer_cer_equal_jiwer(refs, hyps):
    wer, cer = wer_cer(refs, hyps)
    assert wer == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert cer == pytest.approx(100 * jiwer.cer(refs, hyps))


def test_wer_cer_hand_computed():
    wer, cer = wer_cer(*PAIRS[0])
    assert wer == pytest.approx(100 * 2 / 6)  # one insertion + one deletion over 6 words
    assert cer == pytest.approx(100 * 9 / 21)  # " DOWN" inserted (5), "THE " deleted (4)


def test_corpus_level_not_mean_of_utterances():
    wer, _ = wer_cer(["A", "B C D E"], ["X", "B C D E"])
    assert wer == pytest.approx(100 * 1 / 5)  # the per-utterance mean would be 50


def test_empty_hypothesis_counts_deletions():
    wer, cer = wer_cer(["A B", "C"], ["", "C"])
    assert wer == pytest.approx(100 * 2 / 3)
    assert cer == pytest.approx(100 * 3 / 4)


def test_empty_reference_counts_insertions():
    wer, _ = wer_cer(["", "A B"], ["X Y", "A B"])
    assert wer == pytest.approx(100 * 2 / 2)


def test_all_empty_references():
    assert wer_cer([""], [""]) == (0.0, 0.0)
    assert wer_cer([""], ["A"])[0] == float("inf")


def test_normalization_applied_before_scoring():
    assert wer_cer(["Hello, world."], ["HELLO WORLD"]) == (0.0, 0.0)


def test_length_mismatch_refused():
    with pytest.raises(ValueError):
        wer_cer(["A"], ["A", "B"])


class FakeCTC(torch.nn.Module):
    """Emits fixed logits; one frame per 10 samples, so padding frames are identifiable."""

    def __init__(self, frames):
        super().__init__()
        self.frames = frames
        self.w = torch.nn.Parameter(torch.zeros(1))

    def _get_feat_extract_output_lengths(self, lengths):
        return torch.div(lengths, 10, rounding_mode="floor")

    def forward(self, input_values, attention_mask=None):
        return SimpleNamespace(logits=self.frames[: input_values.shape[0]])


def test_evaluate_uses_output_lengths():
    frames = torch.stack([one_hot("A | B C"), one_hot("C A A C")])
    sm = SimpleNamespace(model=FakeCTC(frames), vocab=VOCAB, blank_id=0, word_delimiter="|")
    batch = Batch(torch.zeros(2, 40), None, torch.tensor([40, 20]), ["A BC", "CA"], ["u1", "u2"])
    out = evaluate(sm, [batch], progress=False)
    assert out["hyps"] == ["A BC", "CA"]
    assert out["wer"] == 0.0 and out["cer"] == 0.0 and out["n"] == 2


def test_run_eval_end_to_end(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from recipes.evaluation.evaluate import run_eval
    from recipes.speech.models import random_model, save_model

    save_model(random_model("tiny", "wav2vec2"), tmp_path / "model")
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(tmp_path / f"a{i}.flac", (0.1 * rng.standard_normal(4000 * (i + 1))).astype("float32"), 16000)
    (tmp_path / "l.tsv").write_text("".join(f"a{i}.flac\tHELLO {i}\n" for i in range(3)))
    out = run_eval(str(tmp_path / "model"), tmp_path / "l.tsv", limit=2, progress=False)
    assert out["n"] == 2 and len(out["hyps"]) == 2 and out["wer"] >= 0
    table = capsys.readouterr().out
    assert "WER" in table and "CER" in table and "Wav2Vec2ForCTC" in table


def test_run_eval_needs_data_for_non_demo_model(tmp_path):
    from recipes.evaluation.evaluate import load_eval_data

    with pytest.raises(ValueError, match="--data"):
        load_eval_data(str(tmp_path), None)


def test_run_eval_accepts_speech_model_and_demo_source(tmp_path, monkeypatch):
    import recipes.evaluation.evaluate as ev
    from recipes.speech.models import random_model

    sm = random_model("tiny")
    with pytest.raises(ValueError, match="--data"):
        ev.load_eval_data(sm, None)  # built in memory: no default data set
    sm.source = "demo"
    monkeypatch.setattr(ev, "_demo_utterances", lambda: (["u"], "demo:test"))
    assert ev.load_eval_data(sm, None) == (["u"], "demo:test")


def test_utterance_errors_hand_counted():
    from recipes.evaluation.asr import utterance_errors

    e = utterance_errors(["a b c", "d e", ""], ["a x c d", "e", "f g"])
    # words: sub b->x + ins d | del d | 2 insertions (empty reference)
    assert e.word_edits.tolist() == [2, 1, 2] and e.words.tolist() == [3, 2, 0]
    # chars: sub B->X + ins " D" | del "D " | ins "F G"
    assert e.char_edits.tolist() == [3, 2, 3] and e.chars.tolist() == [5, 3, 0]
    assert e.wer == 100.0 and e.cer == 100.0
    assert wer_cer(["a b c", "d e", ""], ["a x c d", "e", "f g"]) == (100.0, 100.0)


def test_paired_bootstrap_two_utterances_enumerated():
    from recipes.evaluation.asr import paired_bootstrap

    # Resamples of 2 utterances: (0,0) diff 100, (0,1)/(1,0) 50, (1,1) 0, with prob 1/4, 1/2, 1/4:
    # the 2.5 % / 97.5 % percentiles are exactly 0 and 100; the point difference is 50.
    ci = paired_bootstrap([1, 0], [0, 0], [1, 1], resamples=4000, seed=3)
    assert ci["diff"] == 50.0 and ci["low"] == 0.0 and ci["high"] == 100.0
    assert ci["significant"] is False and ci["resamples"] == 4000
    assert paired_bootstrap([1, 0], [0, 0], [1, 1], resamples=4000, seed=3) == ci  # seeded


def test_paired_bootstrap_constant_difference_is_significant():
    from recipes.evaluation.asr import paired_bootstrap

    # every utterance: a has one more error per 2 words than b -> every resample differs by 50
    ci = paired_bootstrap([2, 1, 3], [1, 0, 2], [2, 2, 2], resamples=1000)
    assert ci["low"] == ci["high"] == ci["diff"] == 50.0 and ci["significant"] is True
    flipped = paired_bootstrap([1, 0, 2], [2, 1, 3], [2, 2, 2], resamples=1000)
    assert flipped["high"] == -50.0 and flipped["significant"] is True


@pytest.mark.parametrize("args", [([1], [1, 2], [1, 1]), ([], [], []), ([0, 0], [0, 0], [0, 0])])
def test_paired_bootstrap_bad_input(args):
    from recipes.evaluation.asr import paired_bootstrap

    with pytest.raises(ValueError):
        paired_bootstrap(*args)
