"""Data: dataset readers (LibriSpeech, fairseq manifests, plain TSVs, saved ``datasets``
directories), audio decoding and batching; beside them the demo's tools (speech synthesis, demo
training, shipping the demo)."""
