"""The errors clipdiy raises on purpose; each message says what is wrong and what to do."""


class ClipdiyError(Exception):
    """Base of clipdiy's own errors. ``exit_status``: the job's exit status when one ends it
    (2: refused before any work; 1: failed after work was done)."""

    exit_status: int = 2


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


class RunFailedError(ClipdiyError):
    """The run failed while working, for a reason not about one image (every read failing, say).

    What was written stays valid; starting the job again resumes it. ``exit_status`` is the job's
    exit status (1).
    """

    exit_status = 1


class ErrorBudgetExceededError(RunFailedError):
    """Recent images failed beyond the error budget (``--max-error-rate`` over ``--error-window``).

    The run stopped; what was written stays valid and the next start resumes. Exit status 3, so
    that a scheduler can tell "the data or the model is bad" from "the run broke" (1).
    """

    exit_status = 3


class GpuUnavailableError(ClipdiyError, RuntimeError):
    """GPU inference was asked for (the default on a cluster) and the cluster cannot provide a
    GPU: it has no GPU node type, or none joined within the wait. Raised before any work."""


class ActorStartError(ClipdiyError, RuntimeError):
    """An inference actor could not load the models at its start (weights missing on its node,
    a bad path, a bad vocabulary); the message is the actor's own one-line refusal.

    ``exit_status``: 2 when it stops the job before this start wrote any shard (refused before
    any work), 1 after (``after_work``: failed mid-run, starting again resumes)."""

    def __init__(self, message: str, *, after_work: bool = False):
        super().__init__(message)
        self.exit_status = 1 if after_work else 2


class OutputWriteError(ClipdiyError, RuntimeError):
    """Writing a file under OUTPUT failed: the store is full, read-only, refuses, or is gone. The
    message names the file and the system's reason (``writing <OUTPUT>/runs/<run>/part-...parquet
    failed: [Errno 28] No space left on device``). A fault of the output, not of one image: the
    run stops (exit 1); what was written stays valid and the next start resumes.

    One string argument on purpose: raised in a Ray task, it reaches the driver whole (Ray Data
    appends its retry note to the first argument of an exception, which would become an
    ``OSError``'s file name)."""

    exit_status = 1

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __reduce__(self):
        return (type(self), (self.args[0] if self.args else "", self.errno))
