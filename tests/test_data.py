"""Readers, audio decoding and batching on tiny generated fixtures."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from recipes.data.readers import (
    AudioError,
    detect_format,
    load_audio,
    make_batches,
    open_dataset,
    select_subset,
)

SR = 16000


def tone(seconds, sr=SR, freq=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def write(path, seconds=0.5, sr=SR, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, sr, **kw), sr)
    return path


MODEL = SimpleNamespace(sampling_rate=SR, do_normalize=True, return_attention_mask=True)


def librispeech_tree(root, n=3):
    chap = root / "19" / "198"
    lines = []
    for i in range(n):
        uid = f"19-198-{i:04d}"
        write(chap / f"{uid}.flac", seconds=0.2 + 0.1 * i)
        lines.append(f"{uid} HELLO WORLD {i}")
    (chap / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- readers


def test_librispeech_tree(tmp_path):
    utts = open_dataset(librispeech_tree(tmp_path / "ls"))
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "19-198-0002"]
    assert utts[1].text == "HELLO WORLD 1"
    assert utts[1].path.name == "19-198-0001.flac"
    assert detect_format(tmp_path / "ls") == "librispeech"


def test_librispeech_missing_audio_named(tmp_path):
    root = librispeech_tree(tmp_path / "ls")
    (root / "19" / "198" / "19-198-0001.flac").unlink()
    with pytest.raises(FileNotFoundError, match="19-198-0001.flac"):
        open_dataset(root)


def test_librispeech_empty_transcript_names_file_and_line(tmp_path):
    root = librispeech_tree(tmp_path / "ls")
    trans = root / "19" / "198" / "19-198.trans.txt"
    lines = trans.read_text().splitlines()
    lines[1] = "19-198-0001"
    trans.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"19-198\.trans\.txt:2"):
        open_dataset(root)


def fairseq_manifest(tmp_path, labels="wrd"):
    audio_root = tmp_path / "audio"
    write(audio_root / "a" / "x.flac", 0.3)
    write(audio_root / "b" / "y.flac", 0.4)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text(f"{audio_root}\na/x.flac\t4800\nb/y.flac\t6400\n")
    if labels == "wrd":
        (tmp_path / "dev.wrd").write_text("HELLO WORLD\nGOOD BYE\n")
    else:
        (tmp_path / "dev.ltr").write_text("H E L L O | W O R L D |\nG O O D | B Y E |\n")
    return tsv


@pytest.mark.parametrize("labels", ["wrd", "ltr"])
def test_fairseq_manifest(tmp_path, labels):
    tsv = fairseq_manifest(tmp_path, labels)
    assert detect_format(tsv) == "fairseq"
    utts = open_dataset(tsv)
    assert [u.id for u in utts] == ["a/x", "b/y"]
    assert [u.text for u in utts] == ["HELLO WORLD", "GOOD BYE"]
    assert utts[0].path == tmp_path / "audio" / "a" / "x.flac"


def test_fairseq_path_escape_refused(tmp_path):
    tsv = fairseq_manifest(tmp_path)
    write(tmp_path / "secret.flac")
    tsv.write_text(f"{tmp_path / 'audio'}\na/x.flac\t4800\n../secret.flac\t8000\n")
    with pytest.raises(ValueError, match=r"\.\./secret\.flac"):
        open_dataset(tsv)


def test_fairseq_missing_file_named(tmp_path):
    tsv = fairseq_manifest(tmp_path)
    (tmp_path / "audio" / "b" / "y.flac").unlink()
    with pytest.raises(FileNotFoundError, match=r"y\.flac"):
        open_dataset(tsv)


def test_fairseq_empty_transcript_line(tmp_path):
    tsv = fairseq_manifest(tmp_path)
    (tmp_path / "dev.wrd").write_text("HELLO WORLD\n   \n")
    with pytest.raises(ValueError, match=r"dev\.wrd:2"):
        open_dataset(tsv)


def test_plain_tsv(tmp_path):
    write(tmp_path / "clips" / "one.wav", 0.25)
    write(tmp_path / "clips" / "two.flac", 0.5)
    tsv = tmp_path / "list.tsv"
    tsv.write_text("clips/one.wav\tfirst clip\nclips/two.flac\tsecond  clip\n")
    assert detect_format(tsv) == "plain"
    utts = open_dataset(tsv)
    assert [(u.id, u.text) for u in utts] == [("clips/one", "first clip"), ("clips/two", "second clip")]


def test_plain_tsv_escape_and_empty_transcript(tmp_path):
    write(tmp_path / "outside.flac")
    sub = tmp_path / "sub"
    write(sub / "in.flac")
    tsv = sub / "list.tsv"
    tsv.write_text("in.flac\tok\n../outside.flac\tnope\n")
    with pytest.raises(ValueError, match=r"outside\.flac"):
        open_dataset(tsv)
    tsv.write_text("in.flac\tok\nin.flac\t \n")
    with pytest.raises(ValueError, match=r"list\.tsv:2"):
        open_dataset(tsv)
    tsv.write_text("in.flac\tok\nu0.flac HELLO WORLD\n")  # a space where the tab should be
    with pytest.raises(ValueError, match=r"list\.tsv:2: no tab in 'u0\.flac HELLO WORLD'"):
        open_dataset(tsv)


# ----------------------------------------------------------------------------- audio


def test_stereo_44k_resampled_to_16k_mono(tmp_path, caplog):
    path = write(tmp_path / "st.flac", seconds=1.0, sr=44100, channels=2)
    with caplog.at_level(logging.WARNING, logger="recipes.data.readers"):
        wav = load_audio(path, SR)
    assert wav.ndim == 1 and wav.dtype == np.float32
    assert len(wav) == SR  # 44100 samples -> exactly 16000
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{path}: 44100 Hz, resampled to the model's 16000 Hz" in warnings
    assert f"{path}: 2 channels, mixed down to mono" in warnings
    # mono = mean of channels (1.0 and 0.5 scaled tone): amplitude ~0.3 * 0.75
    assert abs(np.abs(wav[1000:-1000]).max() - 0.225) < 0.01


def test_corrupt_file_named_and_skipped(tmp_path, caplog):
    tsv = tmp_path / "list.tsv"
    write(tmp_path / "good.flac")
    (tmp_path / "bad.flac").write_bytes(b"not audio at all" * 10)
    tsv.write_text("good.flac\tgood\nbad.flac\tbad\n")
    utts = open_dataset(tsv)
    with pytest.raises(AudioError, match=r"bad\.flac"):
        make_batches(utts, MODEL)
    with caplog.at_level(logging.WARNING, logger="recipes.data.readers"):
        batches = make_batches(utts, MODEL, skip_bad=True)
    assert batches.num_utterances == 1 and len(batches.skipped) == 1
    assert "bad.flac" in batches.skipped[0]
    assert "skipped 1 unreadable" in caplog.text


# ----------------------------------------------------------------------------- batching


def many_utts(tmp_path, n=10):
    lines = []
    for i in range(n):
        write(tmp_path / f"u{i}.flac", seconds=0.1 + 0.05 * ((i * 7) % n))
        lines.append(f"u{i}.flac\tWORD {i}")
    (tmp_path / "l.tsv").write_text("\n".join(lines) + "\n")
    return open_dataset(tmp_path / "l.tsv")


def test_deterministic_limit(tmp_path):
    utts = many_utts(tmp_path)
    a, b = select_subset(utts, 4, seed=0), select_subset(utts, 4, seed=0)
    assert a == b and len(a) == 4
    assert select_subset(utts, 4, seed=1) != a or len(utts) == 4
    ids = sorted(i for batch in make_batches(utts, MODEL, limit=4) for i in batch.ids)
    assert ids == sorted(u.id for u in a)


def test_batches_hold_equal_lengths_only_never_padded(tmp_path):
    lines = []
    for i, seconds in enumerate([0.3, 0.1, 0.3, 0.2, 0.3, 0.1, 0.25]):  # 4 distinct lengths
        write(tmp_path / f"u{i}.flac", seconds=seconds, freq=300.0 + 50 * i)
        lines.append(f"u{i}.flac\tWORD {i}")
    (tmp_path / "l.tsv").write_text("\n".join(lines) + "\n")
    utts = open_dataset(tmp_path / "l.tsv")
    lengths_of = {u.id: int(round(sf.info(str(u.path)).frames)) for u in utts}
    for seconds in (0.05, 1.0, 100.0):
        batches = make_batches(utts, MODEL, batch_seconds=seconds)
        assert batches.num_utterances == len(utts)
        all_lengths = [int(x) for b in batches for x in b.lengths]
        assert all_lengths == sorted(all_lengths)
        for b in batches:
            n = b.input_values.shape[1]
            assert [lengths_of[i] for i in b.ids] == [n] * len(b.ids)  # same length, no padding
            assert b.lengths.tolist() == [n] * len(b.ids)
            assert b.attention_mask.sum(1).tolist() == [n] * len(b.ids)
            assert n * len(b.ids) <= SR * seconds or len(b.ids) == 1
            for row in b.input_values:
                seg = row.double()
                assert abs(seg.mean()) < 1e-4 and abs(seg.std(unbiased=False) - 1) < 1e-3
    # a large budget groups all utterances of one length together; a small one splits them
    assert len(make_batches(utts, MODEL, batch_seconds=100.0)) == 4
    assert len(make_batches(utts, MODEL, batch_seconds=0.5)) == 6  # the three 0.3 s ones alone
    with pytest.raises(ValueError, match="batch_seconds"):
        make_batches(utts, MODEL, batch_seconds=0)


def test_no_attention_mask_no_normalize(tmp_path):
    utts = many_utts(tmp_path, 3)
    sm = SimpleNamespace(sampling_rate=SR, do_normalize=False, return_attention_mask=False)
    batches = make_batches(utts, sm)
    assert all(b.attention_mask is None for b in batches)
    peak = max(float(b.input_values.abs().max()) for b in batches)
    assert abs(peak - 0.3) < 0.01  # raw waveform, not normalised


def test_transcripts_that_are_not_utf8_name_file_and_line(tmp_path):
    write(tmp_path / "a.flac")
    (tmp_path / "l.tsv").write_bytes("a.flac\tHELLO\na.flac\tCAF\xc9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"l\.tsv:2: not UTF-8"):
        open_dataset(tmp_path / "l.tsv")


def test_audio_shorter_than_the_receptive_field_is_refused(tmp_path):
    from recipes.speech.models import random_model

    sm = random_model("tiny", seed=0)
    write(tmp_path / "short.flac", seconds=100 / SR)
    write(tmp_path / "ok.flac", seconds=0.5)
    (tmp_path / "l.tsv").write_text("short.flac\tHI\nok.flac\tHI\n")
    utts = open_dataset(tmp_path / "l.tsv")
    with pytest.raises(AudioError, match=r"short\.flac: 100 samples is shorter than the model's receptive field"):
        make_batches(utts, sm)
    batches = make_batches(utts, sm, skip_bad=True)
    assert batches.num_utterances == 1 and batches.skipped == [str(tmp_path / "short.flac")]
