"""dicom-ai-node: network (DICOM receive and send), scheduling, and the ``ainode`` CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicom-ai-node")  # pyproject.toml is the one place it is written
except PackageNotFoundError:  # run from a tree that was never installed
    __version__ = "0+unknown"
