"""Format names, importable without torch (the CLI lists them in --help)."""
FORMAT_NAMES = ("pytorch", "onnx", "executorch", "torchscript", "coreml")
