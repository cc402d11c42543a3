"""Speech-model recipes: data, model adapters, WER evaluation, StableQuant (Algorithm 1), reports, export."""
