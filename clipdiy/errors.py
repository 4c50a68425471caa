"""The errors clipdiy raises on purpose; each message says what is wrong and what to do."""


class ClipdiyError(Exception):
    """Base of clipdiy's own errors."""


class WeightsNotFoundError(ClipdiyError, FileNotFoundError):
    """Model weights could not be found locally nor downloaded.

    The message names what is missing and the option (config field and command-line flag) that
    supplies it.
    """


class VocabularyError(ClipdiyError, ValueError):
    """A vocabulary is empty, malformed, has duplicate names, or its file is missing."""


class InvalidImageError(ClipdiyError, ValueError):
    """An image cannot be segmented (empty, wrong shape or dtype, too small, too large).

    ``kind`` is a short machine-readable reason used in error rows (e.g. ``empty``, ``too_large``).
    """

    def __init__(self, message: str, kind: str = "unsupported"):
        super().__init__(message)
        self.kind = kind


class InputError(ClipdiyError, ValueError):
    """The job's input cannot be labelled: missing or unreachable bucket, prefix or manifest,
    access denied, a malformed manifest, or no images at all. Raised before any work starts."""


class GpuUnavailableError(ClipdiyError, RuntimeError):
    """GPU inference was asked for (the default on a cluster) and the cluster cannot provide a
    GPU: it has no GPU node type, or none joined within the wait. Raised before any work."""


class ActorStartError(ClipdiyError, RuntimeError):
    """An inference actor could not load the models at its start (weights missing on its node,
    a bad path, a bad vocabulary); the message is the actor's own one-line refusal."""
