"""Exported ONNX CTC models (``recipes.export.onnx_runner.OnnxCTCModel``) run through ONNX Runtime.

Only the running half of the contract: an exported graph has no blocks to cache or re-export.
"""

from __future__ import annotations

import sys

from .contract import SpeechFamily


class OnnxCTCFamily(SpeechFamily):
    name = "onnx"

    def claims_module(self, model) -> bool:
        runner = sys.modules.get("recipes.export.onnx_runner")  # no model of ours exists before it is imported
        return runner is not None and isinstance(model, runner.OnnxCTCModel)

    def logits(self, model, input_values, attention_mask=None):
        return model(input_values, attention_mask=attention_mask).logits

    def output_lengths(self, model, lengths):
        return model.output_lengths(lengths)


FAMILY = OnnxCTCFamily()
