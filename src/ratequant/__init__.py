"""ratequant: mixed-precision KV-cache quantization chosen by rate-distortion theory."""

__version__ = "0.1.0"
