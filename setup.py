"""Only the optional compiled scanner lives here; everything else about the package is in pyproject.toml.

``optional=True``: without a C compiler the build warns and goes on, and pgmux runs the same walk
in pure Python (proxy/protocol/framing.py picks whichever it finds).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.protocol._scanner", ["proxy/protocol/_scanner.c"], optional=True)])
