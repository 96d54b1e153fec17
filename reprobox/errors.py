"""The one error family of reprobox: a message, a hint, and the exit code it maps to."""

from __future__ import annotations

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CHECK_FAILED",
    "EXIT_INTERNAL",
    "EXIT_MISSING",
    "EXIT_OK",
    "EXIT_UNRECORDED",
    "BuildError",
    "CheckError",
    "EngineError",
    "LockError",
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

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def render(self) -> str:
        """One paragraph: what went wrong, then what to do about it."""
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class SpecError(ReproboxError):
    """The spec file is malformed, mistyped or asks for something impossible."""


class LockError(ReproboxError):
    """Resolving, reading or verifying the lock (or the wheel cache) failed."""


class EngineError(ReproboxError):
    """The container engine (or a tool the pipeline needs) is not there or refused."""

    exit_code = EXIT_MISSING


class BuildError(ReproboxError):
    """A build step failed; carries the failing instruction and the tail of its log."""

    exit_code = EXIT_CHECK_FAILED

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


class CheckError(ReproboxError):
    """The self-check found that training in the image is not reproducible."""

    exit_code = EXIT_CHECK_FAILED
