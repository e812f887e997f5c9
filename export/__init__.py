"""Export to ONNX / Ascend OM and the runtimes that drive exported graphs."""
