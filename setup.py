"""The one compiled part of fastmae: the loader's resampling taps (``fastmae/_resample.c``, plain C, no torch headers,
built in about a second). Everything else is in pyproject.toml.

The extension is optional: where no C compiler (or no Python headers) is found, pip installs fastmae without it and
the loader resamples with torch's matrix products instead, saying so in its log (``train/data/resample.py``)."""

import sys

from setuptools import Extension, setup

# -Wno-psabi: GCC notes that a 32-byte vector is returned another way without AVX; the one such helper is always
# inlined (fastmae/_resample.c, load8)
flags = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]
setup(ext_modules=[Extension("fastmae._resample", ["fastmae/_resample.c"], optional=True, extra_compile_args=flags)])
