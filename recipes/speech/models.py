"""Model entry points of the recipes: resolve ``--model`` to a SpeechModel.

The family specifics live in :mod:`recipes.speech` (one file per family); this module keeps the
names the rest of the code and users import.
"""

from __future__ import annotations

from pathlib import Path

from recipes.speech import LayerInfo, SpeechModel, layer_inventory, load_speech_model, remove_weight_norm
from recipes.speech.hf_ctc import (
    CHAR_VOCAB,
    SHORT_TO_ARCH,
    SUPPORTED_ARCHS,
    load_ctc_model,
    random_config,
    random_model,
    save_model,
)

__all__ = [
    "CHAR_VOCAB", "SHORT_TO_ARCH", "SUPPORTED_ARCHS", "LayerInfo", "SpeechModel", "layer_inventory",
    "load_ctc_model", "random_config", "random_model", "remove_weight_norm", "resolve_model", "save_model",
]


def resolve_model(name_or_path: str | Path) -> SpeechModel:
    """"demo" -> the bundled demo model; anything else goes to the first family that reads it
    (HF directory, fairseq .pt, torchaudio:BUNDLE, ...)."""
    if str(name_or_path) == "demo":
        try:
            from recipes.demo import DEMO_MODEL_DIR
        except ImportError as e:
            raise FileNotFoundError(
                "the demo model is not available (recipes.demo.DEMO_MODEL_DIR missing): "
                f"{e}") from e
        if not Path(DEMO_MODEL_DIR).is_dir():
            raise FileNotFoundError(f"the demo model is not present yet at {DEMO_MODEL_DIR}")
        sm = load_ctc_model(DEMO_MODEL_DIR)
        sm.source = "demo"
        return sm
    return load_speech_model(name_or_path)
