"""Build of the optional native decode kernel; everything else is in pyproject.toml.

The extension is optional: where no C compiler is available the build goes on without it and ratequant
uses its PyTorch implementation of the same decode (bit-identical, slower); ``ratequant info`` says which.
"""

import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-std=c11", "-Wall"]

setup(
    ext_modules=[
        Extension("ratequant.kernels._native", ["src/ratequant/kernels/_native.c"], extra_compile_args=FLAGS, optional=True)
    ]
)
