"""One utterance of a data set, as every reader returns it (audio decoded later, once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Utterance:
    id: str
    path: Path  # the audio file, or "ARROW_FILE#ROW" for audio stored in a table
    text: str
    audio: object = field(default=None, compare=False, repr=False)  # in-table audio: has read()
    where: str = field(default="", compare=False)  # "file:line" of the transcript, for messages
