"""KV quantizer designs, one per module, available by name through :func:`get_quantizer`."""

from ratequant.quantizers.base import (
    MAX_BITS,
    MIN_BITS,
    QuantizedTensor,
    Quantizer,
    available,
    from_config,
    get_quantizer,
    register,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "QuantizedTensor",
    "Quantizer",
    "available",
    "from_config",
    "get_quantizer",
    "register",
]
