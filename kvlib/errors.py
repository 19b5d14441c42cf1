"""One exception tree. The CLI turns any KvlibError into one red line and exit code 1."""


class KvlibError(Exception):
    """Base of every error kvlib raises on purpose."""


class UnsupportedModelError(KvlibError):
    """The model's architecture or rope scaling is not one kvlib can reproduce exactly."""


class ModelLoadError(KvlibError):
    """The model path is missing, unreadable, or not a model."""


class NotFoundError(KvlibError):
    """A key, document or path does not exist, or the tenant may not see it.

    The two cases must read identically so that nothing leaks existence.
    """


class AmbiguousKeyError(KvlibError):
    """A key prefix matches more than one chunk."""


class CorruptBlobError(KvlibError):
    """A blob's checksum or shape disagrees with the manifest."""


class InputError(KvlibError):
    """Bad user input: an unreadable file, a malformed record, an empty corpus."""


class ModelMismatchError(KvlibError):
    """Cached KV was produced by a different model fingerprint than the one loaded."""


class ModelFetchError(ModelLoadError):
    """A known model could not be fetched: a part is missing or corrupt, or the index is unreachable."""


class ManifestUnavailableError(KvlibError):
    """The manifest database (PostgreSQL) cannot be reached; nothing was changed."""


class StoreUnavailableError(CorruptBlobError):
    """The remote blob store cannot be reached and the local tier lacks the blob.

    A CorruptBlobError on purpose: every caller that already re-encodes a bad blob
    (query, serve) then recomputes the chunk on the spot, as it must when S3 is down.
    """


class CalibrationMissingError(KvlibError):
    """A `guard:B` mode was asked for a model (and encoding) that has no calibration in the library."""
