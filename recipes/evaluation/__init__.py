"""Evaluation: greedy CTC decoding, WER/CER as the model's vocabulary spells text, bootstrap
intervals, and ``stablequant eval``."""
