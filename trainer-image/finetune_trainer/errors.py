"""Errors the trainer reports to the operator through its exit code.

The operator's Job has a podFailurePolicy that fails the Job at once on `EXIT_CONFIG_ERROR`
(retrying a job whose spec or data is wrong only burns GPU hours), and ignores pods that were
disrupted (evicted, preempted), whatever they exit with.
"""

from __future__ import annotations

EXIT_CONFIG_ERROR = 78
"""sysexits.h EX_CONFIG: the spec, the data or the template is wrong; retrying cannot help."""

EXIT_INTERRUPTED = 143
"""128 + SIGTERM: stopped on request after writing a checkpoint; a new pod resumes from it."""


class ConfigError(Exception):
    """A problem the user must fix in the job: names the field and what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DivergedError(ConfigError):
    """The loss was not finite for spec.training.maxNonFiniteSteps steps in a row: the same spec
    and data diverge again on a retry, so it exits like a configuration error."""
