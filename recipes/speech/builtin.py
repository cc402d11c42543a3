"""The built-in families, registered through the same hook as third-party ones."""

from __future__ import annotations

from .hooks import hookimpl


@hookimpl(trylast=True)
def sq_speech_model_families():
    from . import fairseq_ctc, hf_ctc, onnx_ctc, torchaudio_ctc

    return [onnx_ctc.FAMILY, hf_ctc.FAMILY, fairseq_ctc.FAMILY, torchaudio_ctc.FAMILY]
