"""Hugging Face ``datasets`` directories written by ``save_to_disk``, read with pyarrow alone.

Such a directory holds ``state.json`` (the Arrow files, in order), ``dataset_info.json`` (the
features) and ``data-*.arrow`` files in Arrow's streaming format. The audio column is an ``Audio``
feature (a struct of encoded ``bytes`` and a ``path``), or a plain struct of ``array`` and
``sampling_rate``, or bare bytes / a path; the transcript is the first of ``TEXT_COLUMNS`` present.
The tables are memory-mapped and each row's audio is decoded only when the batches are built.
A ``DatasetDict`` directory (``dataset_dict.json``) is refused with its split names: pass one split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from recipes.data.utterance import Utterance

TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
AUDIO_COLUMNS = ("audio", "speech", "file", "path")
ID_COLUMNS = ("id", "utt_id", "key", "segment_id")


def is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_table(path: Path):
    import pyarrow as pa

    if not path.is_file():
        raise FileNotFoundError(f"{path}: Arrow file listed in state.json is missing")
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()  # what save_to_disk writes
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not a readable Arrow file ({e})") from None


class TableAudio:
    """One row's audio in a memory-mapped Arrow column; ``read()`` gives encoded bytes, a file path or
    (samples, sampling_rate)."""

    __slots__ = ("column", "row", "root", "where")

    def __init__(self, column, row: int, root: Path, where: str):
        self.column, self.row, self.root, self.where = column, row, root, where

    def read(self):
        value = self.column[self.row].as_py()
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if value.get("array") is not None:
                if value.get("sampling_rate") is None:
                    raise ValueError(f"{self.where}: audio array without a sampling_rate")
                return np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value)
            return path if path.is_absolute() else self.root / path
        raise ValueError(f"{self.where}: no audio (neither bytes, an array nor a path)")


def read_datasets_dir(directory: str | Path) -> list:
    """The utterances of one saved ``datasets`` split (ids from an id column, else the row number)."""
    import pyarrow as pa

    directory = Path(directory)
    if (directory / "dataset_dict.json").is_file():
        splits = _json(directory / "dataset_dict.json").get("splits", [])
        raise ValueError(f"{directory}: a DatasetDict with splits {splits}; pass one split's directory, "
                         f"e.g. {directory / (splits[0] if splits else 'test')}")
    state = _json(directory / "state.json")
    files = [f.get("filename") for f in state.get("_data_files", []) if isinstance(f, dict)]
    if not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{directory / 'state.json'}: no '_data_files' list of Arrow files")
    utts = []
    for name in files:
        arrow = directory / name
        table = _read_table(arrow)
        names = table.column_names
        audio_col = next((c for c in AUDIO_COLUMNS if c in names), None)
        text_col = next((c for c in TEXT_COLUMNS if c in names), None)
        if audio_col is None or text_col is None:
            raise ValueError(f"{arrow}: need an audio column ({'/'.join(AUDIO_COLUMNS)}) and a transcript column "
                             f"({'/'.join(TEXT_COLUMNS)}); found {names}")
        if not (pa.types.is_struct(table.schema.field(audio_col).type)
                or pa.types.is_binary(table.schema.field(audio_col).type)
                or pa.types.is_large_binary(table.schema.field(audio_col).type)
                or pa.types.is_string(table.schema.field(audio_col).type)):
            raise ValueError(f"{arrow}: column {audio_col!r} has type {table.schema.field(audio_col).type}, "
                             "not audio (struct of bytes/path or array/sampling_rate, bytes, or a path)")
        id_col = next((c for c in ID_COLUMNS if c in names), None)
        texts = table.column(text_col).to_pylist()
        ids = table.column(id_col).to_pylist() if id_col else None
        audio = table.column(audio_col).combine_chunks()
        for row, text in enumerate(texts):
            where = f"{arrow}#{row}"
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: empty transcript in column {text_col!r}")
            utt_id = str(ids[row]) if ids is not None else f"{Path(name).stem}-{row:06d}"
            utts.append(Utterance(utt_id, Path(where), " ".join(text.split()),
                                  audio=TableAudio(audio, row, directory, where), where=f"{where} ({text_col})"))
    return utts
