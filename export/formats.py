"""Names and defaults the CLI shows in --help, importable without torch."""
FORMAT_NAMES = ("pytorch", "onnx", "executorch", "torchscript", "coreml")
# ``fieldid bench``: pause before each timed block (ONNX Runtime / OpenMP threads spin after a call).
BENCH_SETTLE_S = 0.3
