"""Errors a user can cause. The CLI turns them into one message and a non-zero exit."""

import os
import signal
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # the exit code of every error a user can fix (as argparse's)

# In a multi-process job, a rank other than 0 waits this long before reporting its error,
# so that when rank 0 fails alike its message comes first and the launcher stops the rest.
RANK_GRACE_S = 3.0


def env_rank() -> int:
    """This process's rank as its launcher (torchrun, SLURM, submitit) tells it, before
    any process group exists; 0 when alone. Here, free of torch, so that the command
    reports an error in its arguments without importing torch first."""
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class UserError(Exception):
    """A problem with the user's config, data or files, explained in the message."""


class ConfigError(UserError):
    """Settings that cannot work together, found before any data loads."""


class Interrupted(UserError):
    """SIGINT or SIGTERM arrived; the run stopped at a step boundary. ``exit_code`` is
    128 + the signal number, as a shell reports a signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def run_command(prog: str, work: Callable[[], int]) -> int:
    """Run a command's ``work`` and return its exit code: a ``UserError`` becomes one line
    on stderr and exit 2; SIGINT or SIGTERM unwinds the work (so its ``finally`` blocks
    remove what was half written) and exits 128 + the signal."""
    received = [signal.SIGINT]

    def interrupt(signum: int, frame: object) -> None:
        received[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        return work()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 128 + int(received[0])
