"""Storage and kernels: bit packing of the codes and the optional native decode kernel.

:mod:`~ratequant.kernels.native` is exported as a module, for benchmarks that time the kernel: its switch reads
``native.disabled()`` (the PyTorch path for a ``with`` block) and ``native.describe()`` (which path decodes).
"""

from ratequant.kernels import native

__all__ = ["native"]
