"""Typed errors of the node.

Each error says whether a retry can help: the job queue retries `TransientError`s with backoff and sends
`PermanentError`s straight to the dead letter (see DESIGN.md, "Queue and persistence").
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Invalid configuration; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at '{key}': {message}")
        self.key = key


class RuleError(NodeError):
    """Invalid routing rule definition."""


class TransientError(NodeError):
    """A failure a later retry may cure (peer down, timeout, busy)."""


class PermanentError(NodeError):
    """A failure retrying will not cure (association rejected, 0xA9xx/0xCxxx status, HTTP 4xx)."""


class InvalidDicomError(PermanentError):
    """A received or spooled object is not readable DICOM, or a series is not one regular grid."""


class SeriesGeometryError(InvalidDicomError):
    """A series whose patient-space geometry cannot be derived: an Image Plane attribute the grid needs
    (PixelSpacing, ImageOrientationPatient, ImagePositionPatient; SliceThickness for a single slice) is
    empty or absent. Raised while loading the headers, before any pixel is decoded or a model runs."""

    def __init__(self, series_instance_uid: str, attribute: str, detail: str) -> None:
        super().__init__(f"series {series_instance_uid}: {detail}")
        self.series_instance_uid = series_instance_uid
        self.attribute = attribute
        self.detail = detail

    def __reduce__(self) -> tuple[type[SeriesGeometryError], tuple[str, str, str]]:
        # The inference host sends errors between processes: rebuild from the three fields, not args.
        return type(self), (self.series_instance_uid, self.attribute, self.detail)


class DatabaseError(TransientError):
    """The database could not be used (unreachable, connection lost, locked, disk I/O error).

    persistence/ raises it in place of the driver's error, so no other package needs SQLAlchemy's
    exception types; the message is the driver's one line, never an SQL statement or its parameters.
    """


class StorageError(NodeError):
    """The spool could not durably store a file (disk full, I/O error)."""


class InferenceError(PermanentError):
    """The model could not produce a result for this input."""


class EncodeError(PermanentError):
    """A result could not be encoded as valid DICOM (source headers or model output unusable)."""


class ModelNotFoundError(PermanentError):
    """A rule names a model the registry does not know."""


class DeliveryError(NodeError):
    """Base for delivery failures; use the Transient/Permanent subclasses."""


class TransientDeliveryError(DeliveryError, TransientError):
    pass


class PermanentDeliveryError(DeliveryError, PermanentError):
    pass


class QueryNotSupportedError(PermanentDeliveryError):
    """The destination offers no query to read back what it stored: C-FIND refused at association (no
    accepted presentation context) or 0x0122, QIDO-RS answered 404/405/501. The send itself succeeded."""


class InferenceTimeoutError(TransientError):
    """A model ran past models.inference_timeout_s; its process was killed.

    Transient, unlike InferenceError: a model can be slow for a while (a GPU shared with another job, a
    busy host, a first load from a cold disk), so the job is retried with backoff; a model that hangs on
    this input every time ends in the dead letter after worker.max_attempts, with this message."""


class AccountError(NodeError):
    """A user or API token change was refused: duplicate or unknown user, weak password, role too high."""


class RuleConflictError(NodeError):
    """A rule save was refused: another save came first (expected version is not the current one),
    the id already exists (create), or it is unknown or deleted (update, delete, rollback)."""


class PullError(NodeError):
    """Base for query/retrieve failures from a PACS source; use the Transient/Permanent subclasses."""


class TransientPullError(PullError, TransientError):
    pass


class PermanentPullError(PullError, PermanentError):
    pass


class StudyNotFoundError(PermanentPullError):
    """The source holds no such study (or series): the message is the one line the CLI prints."""
