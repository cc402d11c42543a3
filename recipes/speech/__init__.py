"""Speech models behind one contract (``contract.py``), one file per family, families via pluggy.

    from recipes.speech import load_speech_model, family_of
    sm = load_speech_model("my_model_dir")          # HF directory, fairseq .pt, torchaudio:BUNDLE, ...
    logits = family_of(sm).logits(sm.model, x)      # what every recipe asks, whatever the family
"""

from .contract import (
    LAYER_KINDS,
    BlockLayout,
    LayerInfo,
    SpeechFamily,
    SpeechModel,
    conv_output_lengths,
    remove_weight_norm,
)
from .registry import (
    families,
    family_named,
    family_of,
    hookimpl,
    load_speech_model,
    register_family_plugin,
    unregister_family_plugin,
    wrap_speech_model,
)


def layer_inventory(model) -> list[LayerInfo]:
    """Every Conv1d/Linear in model order, tagged cnn / pos_conv / transformer / head by its family."""
    from torch import nn

    net = model.model if isinstance(model, SpeechModel) else model
    family = family_of(net)
    layout = family.blocks(net)
    counters: dict[str, int] = {}
    out = []
    for path, module in net.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Linear)):
            continue
        kind = family.layer_kind(net, path, layout)
        # isinstance, not type name: weight-normed convs are "ParametrizedConv1d"
        module_type = "Conv1d" if isinstance(module, nn.Conv1d) else "Linear"
        out.append(LayerInfo(path, kind, counters.get(kind, 0), module_type))
        counters[kind] = counters.get(kind, 0) + 1
    return out


def output_lengths(model, lengths):
    """Valid CTC frames per utterance of ``model`` (a module or SpeechModel) for input lengths."""
    net = model.model if isinstance(model, SpeechModel) else model
    return family_of(net).output_lengths(net, lengths)


__all__ = [
    "LAYER_KINDS", "BlockLayout", "LayerInfo", "SpeechFamily", "SpeechModel", "conv_output_lengths",
    "families", "family_named", "family_of", "hookimpl", "layer_inventory",
    "load_speech_model", "output_lengths", "register_family_plugin", "remove_weight_norm",
    "unregister_family_plugin", "wrap_speech_model",
]
