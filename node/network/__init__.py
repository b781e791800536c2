"""The DICOM front door: a pynetdicom C-ECHO/C-STORE SCP that only persists.

``contexts`` says what the node accepts, ``acl`` who may associate, ``tls``
how the transport is secured, ``status`` which DIMSE status each outcome
gets, and ``scp`` ties them to the storage layer (``storage.ingest``).
"""

from node.network.scp import Receiver, ReceiverSettings

__all__ = ["Receiver", "ReceiverSettings"]
