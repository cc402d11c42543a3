"""The pluggy hook that adds speech-model families (built-ins register through it too)."""

from __future__ import annotations

import pluggy

from .contract import SpeechFamily

PROJECT = "sq_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class SpeechFamilySpec:
    @hookspec
    def sq_speech_model_families(self) -> list[SpeechFamily]:
        """Return SpeechFamily instances. Families are asked in registration order, built-ins
        last, so a plugin can claim a module or path before the built-in that would."""
