"""The package version, read from the installed package's metadata: pyproject.toml's ``version`` is the one source.

A source checkout put on ``sys.path`` without ``pip install -e .`` has no metadata; its version is then
``"0+unknown"`` (recorded as such in manifests and result files) rather than a number that may be stale.
"""

from importlib import metadata

try:
    __version__ = metadata.version("sinklens")
except metadata.PackageNotFoundError:
    __version__ = "0+unknown"

__all__ = ["__version__"]
