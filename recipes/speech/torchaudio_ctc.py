from .contract import SpeechFamily


class _F(SpeechFamily):
    name = "torchaudio"


FAMILY = _F()
