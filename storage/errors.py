"""The node's exception tree. Library errors are translated where they enter.

    NodeError
    ├── ConfigError            bad configuration; the message names the key
    ├── StorageError           database or file store failure
    │   ├── OutOfSpaceError    free space below the configured floor
    │   └── ConflictError      a different object under an existing UID, a name taken
    │       └── JobNotHeldError  a worker's job was cancelled, requeued or claimed by another
    ├── InputError             a DICOM object or series we refuse to process
    │   └── GeometryError      a series that cannot become one correct volume
    ├── ModelError             a model package that is missing, invalid or refused
    ├── PipelineError          a processing stage failed (carries the stage name)
    └── TransferError          a peer refused or failed an association or a store

Why one tree: the CLI maps a NodeError to a message and an exit code, the
scheduler records its text and stage on the job, and everything else is a bug
that should surface with its traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "GeometryError",
    "InputError",
    "JobNotHeldError",
    "ModelError",
    "NodeError",
    "OutOfSpaceError",
    "PipelineError",
    "StorageError",
    "TransferError",
]


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    pass


class StorageError(NodeError):
    pass


class OutOfSpaceError(StorageError):
    pass


class ConflictError(StorageError):
    pass


class JobNotHeldError(ConflictError):
    """The worker lost its job (lease lapsed, cancelled, claimed by another, not RUNNING).

    Its own class because a worker must refuse its result quietly for exactly
    this, and record every other conflict (a UID clash while saving) as a failure.
    A ConflictError still, so handlers written before it keep catching it.
    """


class InputError(NodeError):
    pass


class GeometryError(InputError):
    pass


class ModelError(NodeError):
    pass


class PipelineError(NodeError):
    """A stage failed; ``stage`` is recorded on the job so an admin sees where."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


class TransferError(NodeError):
    pass
