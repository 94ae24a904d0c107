"""Build script: the optional C++/CUDA extension lives in csrc/ (see csrc/README.md).

Until the extension lands, this installs the pure-Python package (torch and Triton paths).
"""
from setuptools import setup

setup()
