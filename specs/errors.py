"""The two kinds of failure a user sees, shared by every layer (this is the lowest one).

`InputError`: what the user gave cannot be used (spec, data, model or teacher file, run dir,
checkpoint, resources the cluster lacks). The command line prints it and exits with status 2;
nothing already committed is touched. `JobError`: a job that started failed while running
(exit status 1); what it committed before the failure stays on disk for a rerun to resume.
"""


class InputError(Exception):
    """Bad input: a clear one-line (or listed) message, exit status 2."""


class JobError(RuntimeError):
    """The job could not finish; what was committed before the failure stays on disk."""


class JobStopped(BaseException):
    """SIGTERM arrived (`stillhouse stop`, Ray's job stop, a scheduler's kill): the driver
    unwinds at once and commits nothing more; its workers go with its cluster. A BaseException,
    so that no `except Exception` on the way catches it."""
