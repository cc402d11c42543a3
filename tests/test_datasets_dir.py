"""Saved Hugging Face ``datasets`` directories as data sets. The directories are written here in
save_to_disk's layout (Arrow streaming files + state.json + dataset_info.json) with pyarrow; the
oracle is the same audio and text as files plus a plain TSV, which must give identical batches."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from recipes.data.readers import AudioError, detect_format, make_batches, open_dataset

SR = 16000
MODEL = SimpleNamespace(sampling_rate=SR, do_normalize=True, return_attention_mask=False)


def clips():
    rng = np.random.default_rng(0)
    out = [(0.2 * rng.standard_normal(int(SR * s))).astype("float32") for s in (0.3, 0.25, 0.3)]
    stereo_8k = (0.2 * rng.standard_normal((2400, 2))).astype("float32")
    return out + [stereo_8k], ["HELLO WORLD", "A B C", "SAME LENGTH AS FIRST", "EIGHT KILOHERTZ STEREO"]


def encoded(wav, sr, fmt):
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt, subtype="FLOAT" if fmt == "WAV" else None)  # lossless, as the TSV files
    return buf.getvalue()


def write_saved_dataset(directory, columns: dict, shards=1, features=None):
    """What ``Dataset.save_to_disk`` writes: Arrow *stream* files listed in state.json."""
    directory.mkdir(parents=True)
    table = pa.table(columns)
    n = table.num_rows
    files = []
    for s in range(shards):
        name = f"data-{s:05d}-of-{shards:05d}.arrow"
        part = table.slice(s * n // shards, (s + 1) * n // shards - s * n // shards)
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        files.append({"filename": name})
    (directory / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "x", "_split": "test"}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": features or {}}))
    return directory


def plain_tsv(tmp_path, wavs, texts, rates):
    rows = []
    for i, (wav, text, sr) in enumerate(zip(wavs, texts, rates)):
        sf.write(tmp_path / f"f{i}.wav", wav, sr, subtype="FLOAT")
        rows.append(f"f{i}.wav\t{text}")
    (tmp_path / "plain.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "plain.tsv"


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.texts == y.texts
        np.testing.assert_allclose(x.input_values.numpy(), y.input_values.numpy(), atol=1e-6)


def test_audio_feature_bytes_match_the_same_files(tmp_path, caplog):
    wavs, texts = clips()
    rates = [SR, SR, SR, 8000]
    audio = [{"bytes": encoded(w, sr, "WAV"), "path": f"clip{i}.wav"} for i, (w, sr) in enumerate(zip(wavs, rates))]
    saved = write_saved_dataset(tmp_path / "ds", {"id": [f"u{i}" for i in range(4)], "audio": audio, "text": texts},
                                features={"audio": {"_type": "Audio", "sampling_rate": SR}})
    assert detect_format(saved) == "datasets"
    utts = open_dataset(saved)
    assert [u.id for u in utts] == ["u0", "u1", "u2", "u3"] and [u.text for u in utts] == texts
    with caplog.at_level(logging.WARNING, logger="recipes.data.readers"):
        got = make_batches(utts, MODEL)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "data-00000-of-00001.arrow#3: 2 channels, mixed down" in warned
    assert "data-00000-of-00001.arrow#3: 8000 Hz, resampled" in warned
    same_batches(got, make_batches(open_dataset(plain_tsv(tmp_path, wavs, texts, rates)), MODEL))


def test_array_struct_sentence_column_and_shards(tmp_path):
    wavs, texts = clips()
    wavs, texts = wavs[:3], texts[:3]
    audio = [{"array": w.tolist(), "sampling_rate": SR, "path": None} for w in wavs]
    saved = write_saved_dataset(tmp_path / "ds", {"audio": audio, "sentence": texts}, shards=2)
    utts = open_dataset(saved)
    assert [u.text for u in utts] == texts  # shard order kept
    same_batches(make_batches(utts, MODEL),
                 make_batches(open_dataset(plain_tsv(tmp_path, wavs, texts, [SR] * 3)), MODEL))


def test_audio_given_as_paths_relative_to_the_directory(tmp_path):
    wavs, texts = clips()
    saved = write_saved_dataset(tmp_path / "ds", {"audio": [{"bytes": None, "path": "clips/a.flac"}], "text": ["A"]})
    (saved / "clips").mkdir()
    sf.write(saved / "clips" / "a.flac", wavs[0], SR)
    batches = make_batches(open_dataset(saved), MODEL)
    assert batches.num_utterances == 1 and batches[0].input_values.shape[1] == len(wavs[0])


def test_bad_datasets_directories_are_named(tmp_path):
    wavs, texts = clips()
    audio = [{"bytes": encoded(wavs[0], SR, "FLAC"), "path": "x.flac"}]
    no_text = write_saved_dataset(tmp_path / "no_text", {"audio": audio, "label": [3]})
    with pytest.raises(ValueError,
                       match=r"data-00000-of-00001.arrow: need an audio column .* found \['audio', 'label'\]"):
        open_dataset(no_text)
    empty = write_saved_dataset(tmp_path / "empty", {"audio": audio, "text": ["  "]})
    with pytest.raises(ValueError, match=r"arrow#0: empty transcript"):
        open_dataset(empty)
    broken = write_saved_dataset(tmp_path / "broken",
                                 {"audio": [{"bytes": b"not audio" * 20, "path": "x"}], "text": ["A"]})
    with pytest.raises(AudioError, match=r"broken/data-00000-of-00001.arrow#0: cannot read audio"):
        make_batches(open_dataset(broken), MODEL)
    corrupt = write_saved_dataset(tmp_path / "corrupt", {"audio": audio, "text": ["A"]})
    (corrupt / "data-00000-of-00001.arrow").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match=r"corrupt/data-00000-of-00001.arrow: not a readable Arrow file"):
        open_dataset(corrupt)
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; pass one split"):
        open_dataset(tmp_path / "dd")
    (corrupt / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt/state.json: not valid JSON"):
        open_dataset(corrupt)


def test_real_save_to_disk_directory(tmp_path):
    """Where the `datasets` library is installed: its own save_to_disk output (Audio feature, bytes)."""
    datasets = pytest.importorskip("datasets")
    wavs, texts = clips()
    features = datasets.Features({"audio": datasets.Audio(sampling_rate=SR), "text": datasets.Value("string")})
    rows = {"audio": [{"bytes": encoded(w, SR, "WAV"), "path": f"{i}.wav"} for i, w in enumerate(wavs[:3])],
            "text": texts[:3]}
    try:
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    except ImportError as e:  # datasets 5 encodes Audio through torchcodec
        pytest.skip(f"this datasets cannot write Audio here: {e}")
    same_batches(make_batches(open_dataset(tmp_path / "saved"), MODEL),
                 make_batches(open_dataset(plain_tsv(tmp_path, wavs[:3], texts[:3], [SR] * 3)), MODEL))


def test_cli_scores_a_datasets_directory_like_the_same_files(tmp_path, capsys):
    from recipes.cli import main
    from recipes.demo import demo_data

    tsv = demo_data("test")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[:3]]
    audio = [{"bytes": (tsv.parent / rel).read_bytes(), "path": rel} for rel, _ in rows]
    saved = write_saved_dataset(tmp_path / "ds", {"audio": audio, "text": [t for _, t in rows]})
    for i, (rel, _) in enumerate(rows):
        (tmp_path / f"{i}.flac").write_bytes((tsv.parent / rel).read_bytes())
    (tmp_path / "three.tsv").write_text("".join(f"{i}.flac\t{t}\n" for i, (_, t) in enumerate(rows)))
    results = []
    for data in (saved, tmp_path / "three.tsv"):
        assert main(["eval", "--model", "demo", "--data", str(data), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["hyps"] == results[1]["hyps"] and results[0]["wer"] == results[1]["wer"]
    assert sorted(results[0]["refs"]) == sorted(t for _, t in rows)  # (in batch order: by length)
