"""Every error reprobox reports to a user, grouped by the exit code it maps to.

An error's exit code is a property of its class, so the code a user (or CI) sees says what kind
of problem it was: 1 a check failed, 2 bad input, 3 the environment lacks something. 4 is any
exception that is not a ReproboxError (a bug in reprobox); `cli.main` maps it. 5 is kept for
`check` on a host whose device class the image records no fingerprint for (nothing to compare
with: neither a failure nor a proof).
"""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CHECK_FAILED",
    "EXIT_INTERNAL",
    "EXIT_MISSING",
    "EXIT_OK",
    "EXIT_UNRECORDED",
    "ArchiveError",
    "BadInputError",
    "BuildError",
    "CheckError",
    "ContainerCancelledError",
    "ContainerTimeoutError",
    "DigestMismatchError",
    "EngineError",
    "GpuUnavailableError",
    "ImageNotFoundError",
    "IndexUnreachableError",
    "LockError",
    "MissingError",
    "NoMatchError",
    "PushInterruptedError",
    "RegistryAuthError",
    "RegistryUnreachableError",
    "ReproboxError",
    "SpecError",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_MISSING = 3
#: A bug in reprobox: any exception that is not a ReproboxError (cli.main's last handler).
EXIT_INTERNAL = 4
#: `check` only: the two runs agree here, but the image records no fingerprint for this host's
#: device class, so there is nothing to compare with (neither a failure nor a proof).
EXIT_UNRECORDED = 5


class ReproboxError(Exception):
    """Base of every error reprobox reports to a user instead of a traceback."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """One paragraph: what went wrong, then what to do about it."""
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


# --- 1: a check failed -----------------------------------------------------------------------


class CheckError(ReproboxError):
    """A check failed: the self-check found training not reproducible, or could not prove it."""

    exit_code = EXIT_CHECK_FAILED


class DigestMismatchError(CheckError):
    """A pulled `base.image` is not the image its pinned digest names; it was not used."""


# --- 2: bad input ----------------------------------------------------------------------------


class BadInputError(ReproboxError):
    """What the user gave (a file, an argument, an image, an archive) cannot be used as it is."""

    exit_code = EXIT_BAD_INPUT


class SpecError(BadInputError):
    """The spec file is malformed, mistyped or asks for something impossible."""


class LockError(BadInputError):
    """Resolving, reading or verifying the lock (or the wheel cache) failed."""


class NoMatchError(LockError):
    """pip found no usable wheel for `requirement`; the lock stage explains why."""

    def __init__(
        self,
        requirement: str,
        usable_versions: tuple[str, ...],
        index_args: tuple[str, ...],
        indexes: tuple[str, ...],
    ) -> None:
        super().__init__(f"no wheel found for {requirement}")
        self.requirement = requirement
        self.usable_versions = usable_versions
        self.index_args = index_args
        self.indexes = indexes


class ImageNotFoundError(BadInputError):
    """The engine holds no image by that name or ID (bad input, not a missing engine)."""


class ArchiveError(BadInputError):
    """An image archive is damaged, foreign, or would change what the engine holds."""


class BuildError(BadInputError):
    """A Dockerfile step (or mmdebstrap) failed; carries the step and the tail of its log.

    Bad input, not a failed check: the build is reprobox's own recipe from verified wheels,
    so a step fails on what the spec asks for (an apt package or version the mirror lacks, a
    wheel that does not install on the base). The log tail says which.
    """

    def __init__(
        self, message: str, step: str = "", log_tail: str = "", hint: str | None = None
    ) -> None:
        super().__init__(message, hint)
        self.step = step
        self.log_tail = log_tail

    def render(self) -> str:
        parts = [self.message]
        if self.step:
            parts.append(f"  step: {self.step}")
        if self.log_tail:
            tail = "\n".join(f"  | {line}" for line in self.log_tail.splitlines())
            parts.append(f"  last lines of its output:\n{tail}")
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


# --- 3: the environment lacks something ------------------------------------------------------


class MissingError(ReproboxError):
    """This host lacks what the command needs: a tool, a writable folder, the network."""

    exit_code = EXIT_MISSING


class IndexUnreachableError(LockError):
    """A package index or a wheel's server does not answer (a LockError by stage, exit 3)."""

    exit_code = EXIT_MISSING


class EngineError(MissingError):
    """The container engine is not there or refused (or a tool the pipeline needs is missing)."""


class GpuUnavailableError(EngineError):
    """A container was to get a GPU and got none: no NVIDIA runtime, no GPU, a refused driver."""


class ContainerTimeoutError(EngineError):
    """A container ran past its time limit and was stopped.

    The environment, not a failed check: nothing was compared, the host did not finish in time
    (a loaded machine, a hung device).
    """


class ContainerCancelledError(EngineError):
    """A container was stopped because the work it served had already failed or was interrupted."""


class RegistryUnreachableError(EngineError):
    """Nothing answers at the registry's address."""


class RegistryAuthError(EngineError):
    """The registry refused the credentials, or there were none."""


class PushInterruptedError(EngineError):
    """The registry stopped answering during the push; a retry resumes from what landed."""
