"""How a CTC model's vocabulary spells text: one codec for CTC targets, WER/CER scoring and the
up-front transcript check.

Nothing here assumes the demo's LibriSpeech vocabulary. The vocabulary decides: its letters set
the case (all upper: transcripts are upper-cased; all lower: lower-cased; both or uncased: kept),
punctuation it has is kept and punctuation it lacks becomes a space, its word delimiter (``|`` or
a space) separates words, and ``<...>`` / ``[...]`` tokens are specials that never spell text. A
letter or digit the vocabulary cannot spell is kept in the scored text (no hypothesis can match
it, as an ``<unk>`` could not) and becomes the unknown token in CTC targets; ``check_transcripts``
names each such character with its file and line before any work starts.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cached_property

log = logging.getLogger(__name__)

_SPECIAL = re.compile(r"^(<[^>]*>|\[[^\]]*\])$")
_UNK_SPELLINGS = ("<unk>", "[UNK]", "<UNK>", "[unk]")
# typographic forms of the ASCII apostrophe, for vocabularies that have only "'"
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'"}


def is_special(token: str) -> bool:
    """``<s>``, ``</s>``, ``<unk>``, ``[PAD]``, ``[UNK]``, ...: tokens that are never text."""
    return len(token) > 1 and bool(_SPECIAL.match(token))


class TextCodec:
    """A vocabulary's spelling rules. Build one with :func:`text_codec` from a SpeechModel."""

    def __init__(self, vocab: Sequence[str], blank_id: int, word_delimiter: str = "|", tokenizer=None):
        self.vocab, self.blank_id, self.word_delimiter = list(vocab), int(blank_id), word_delimiter
        self.tokenizer = tokenizer
        self.index = {tok: i for i, tok in reversed(list(enumerate(self.vocab)))}  # first id wins
        blank = self.vocab[self.blank_id] if 0 <= self.blank_id < len(self.vocab) else None
        self.chars = frozenset(t for t in self.vocab if len(t) == 1 and t not in (word_delimiter, blank))
        self._spelled: dict[str, str | None] = {}
        self._encoded: dict[str, list[int]] = {}
        self._tokenizer_disagrees = False

    @cached_property
    def case(self) -> str:
        """"upper", "lower" or "keep", from the case of the vocabulary's letters."""
        upper = any(c.isupper() for c in self.chars)
        lower = any(c.islower() for c in self.chars)
        return "upper" if upper and not lower else "lower" if lower and not upper else "keep"

    @cached_property
    def unk_id(self) -> int | None:
        unk = getattr(self.tokenizer, "unk_token", None)
        for token in ((unk,) if unk else ()) + _UNK_SPELLINGS:
            if token in self.index:
                return self.index[token]
        return None

    @cached_property
    def delimiter_id(self) -> int | None:
        for token in (self.word_delimiter, " "):
            if token in self.index:
                return self.index[token]
        return None

    def _fold(self, c: str) -> str:
        folded = c.upper() if self.case == "upper" else c.lower() if self.case == "lower" else c
        return folded if len(folded) == 1 else c  # "ß".upper() is "SS": keep the letter

    def _spell(self, c: str) -> str | None:
        """The vocabulary's spelling of one character (maybe several tokens, e.g. NFD marks), or None."""
        if c not in self._spelled:
            folded = self._fold(c)
            candidates = (folded, c, c.upper(), c.lower(), _APOSTROPHES.get(c, ""),
                          unicodedata.normalize("NFD", folded))
            self._spelled[c] = next((s for s in candidates if s and all(x in self.chars for x in s)), None)
        return self._spelled[c]

    def canonical(self, text: str) -> str:
        """The text as this vocabulary writes it: what WER/CER compare and CTC targets encode."""
        out = []
        for c in unicodedata.normalize("NFC", text):
            spelled = None if c.isspace() else self._spell(c)
            if spelled is not None:
                out.append(spelled)
            elif not c.isspace() and unicodedata.category(c)[0] in "LNM":
                out.append(self._fold(c))  # a letter or digit it cannot spell: counted as <unk>
            else:
                out.append(" ")  # whitespace, or punctuation / a symbol the vocabulary lacks
        return " ".join("".join(out).split())

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` the vocabulary cannot spell (each becomes the unknown token)."""
        return [c for c in self.canonical(text) if c != " " and c not in self.chars]

    def encode(self, text: str) -> list[int]:
        """CTC target ids: the model's tokenizer where it has one, else the vocabulary directly."""
        if text not in self._encoded:
            ids = self._hand_ids(text)
            if self.tokenizer is not None:
                ids = self._tokenizer_ids(text, ids)
            self._encoded[text] = ids
        return self._encoded[text]

    def _hand_ids(self, text: str) -> list[int]:
        ids = []
        for c in self.canonical(text):
            if c == " ":
                if self.delimiter_id is None:
                    raise ValueError(f"the vocabulary has no word delimiter ({self.word_delimiter!r} or ' '): "
                                     f"cannot write the CTC targets of {text!r}")
                ids.append(self.delimiter_id)
            elif c in self.index:
                ids.append(self.index[c])
            elif self.unk_id is not None:
                ids.append(self.unk_id)
        return ids

    def _tokenizer_ids(self, text: str, hand: list[int]) -> list[int]:
        """The tokenizer's ids of the canonical text, unless it maps to unknown what the vocabulary spells."""
        ids = list(self.tokenizer(self.canonical(text), add_special_tokens=False)["input_ids"])
        unk = self.unk_id
        if ids != hand and (None in ids or ids.count(unk) > hand.count(unk)):
            if not self._tokenizer_disagrees:
                self._tokenizer_disagrees = True
                log.warning("the model's tokenizer (%s) writes %r as unknown tokens although its vocabulary "
                            "spells it (e.g. do_lower_case=%s); CTC targets use the vocabulary",
                            type(self.tokenizer).__name__, text, getattr(self.tokenizer, "do_lower_case", None))
            return hand
        return ids


_codecs: dict[tuple, TextCodec] = {}


def text_codec(sm) -> TextCodec:
    """The codec of a SpeechModel (or anything with vocab, blank_id, word_delimiter), built once."""
    tokenizer = getattr(sm, "tokenizer", None)
    key = (tuple(sm.vocab), int(sm.blank_id), sm.word_delimiter, id(tokenizer))
    if key not in _codecs:
        if len(_codecs) >= 16:  # a few models per process; the codec holds its tokenizer, so ids stay unique
            _codecs.pop(next(iter(_codecs)))
        _codecs[key] = TextCodec(sm.vocab, sm.blank_id, sm.word_delimiter, tokenizer)
    return _codecs[key]


def check_transcripts(codec: TextCodec, utterances: Iterable, max_places: int = 3) -> dict[str, int]:
    """Warn once per character the vocabulary cannot spell, naming where it occurs; returns counts.

    ``utterances`` have ``text`` and ``where`` ("file:line") or ``id``. Run before any search, so
    an unspellable transcript is a decision made up front, not a failure in the middle of one.
    """
    counts: dict[str, int] = {}
    places: dict[str, list[str]] = {}
    for utt in utterances:
        for c in codec.unknown(utt.text):
            counts[c] = counts.get(c, 0) + 1
            where = places.setdefault(c, [])
            if len(where) < max_places:
                where.append(getattr(utt, "where", "") or str(getattr(utt, "id", "?")))
    unk = codec.vocab[codec.unk_id] if codec.unk_id is not None else None
    for c, n in sorted(counts.items()):
        fate = f"counted as {unk}" if unk else "left out of CTC targets (no unknown token)"
        log.warning("transcript character %r (U+%04X) is not in the model's vocabulary: %s and never "
                    "matched in WER/CER; %d occurrence(s), at %s", c, ord(c), fate, n,
                    ", ".join(places[c]) + (", ..." if n > len(places[c]) else ""))
    return counts
