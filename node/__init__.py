"""dicom-ai-node: network (DICOM receive and send), scheduling, and the ``ainode`` CLI."""

__version__ = "0.1.0"
