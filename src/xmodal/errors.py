"""User-facing errors. The CLI prints these as one line, without a traceback."""


class XModalError(Exception):
    """An error whose message names the file/field and what was expected."""


class WeightsNotFoundError(XModalError):
    """Pretrained weights for a backbone are not available locally."""


class CheckpointMismatchError(XModalError):
    """An adapter checkpoint does not fit the backbone it is loaded onto."""


class DataError(XModalError):
    """Malformed annotation or undecodable media."""


class MissingMediaError(DataError):
    """Items of a split whose media files do not exist (`--allow-missing` evaluates the rest)."""


class UnreadableMediaError(DataError):
    """Gallery items whose media files exist but cannot be decoded."""
