"""Export: Q/DQ ONNX (``onnx``), packed INT4 weights (``int4``), the shared graph helpers
(``graph``), the ONNX Runtime runner, and the TensorRT engine build."""
