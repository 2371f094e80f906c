"""KV quantizer designs, one per module, available by name through :func:`get_quantizer`."""

from ratequant.quantizers.base import (
    DESIGNS,
    MAX_BITS,
    MIN_BITS,
    QuantizedTensor,
    Quantizer,
    available,
    from_config,
    get_quantizer,
    register,
)

# Importing the design modules registers them by name.
from ratequant.quantizers.kivi import Kivi
from ratequant.quantizers.quarot import Quarot
from ratequant.quantizers.turbo import Turbo
from ratequant.quantizers.uniform import Uniform

__all__ = [
    "DESIGNS",
    "Kivi",
    "Quarot",
    "Turbo",
    "Uniform",
    "MAX_BITS",
    "MIN_BITS",
    "QuantizedTensor",
    "Quantizer",
    "available",
    "from_config",
    "get_quantizer",
    "register",
]
