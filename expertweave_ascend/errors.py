"""The errors users see. Each one renders as a single line naming what is wrong and where."""

from pathlib import Path


class ExpertWeaveError(Exception):
    """Base of every error ExpertWeave reports to users."""


class AdapterError(ExpertWeaveError):
    """An adapter (or base checkpoint) file is missing, malformed or does not fit the base model.

    `public` says the same without anything read from the file (tensor names, values): what a server
    answers a remote client, who may have pointed it at a file that is not theirs."""

    def __init__(self, file: str | Path, problem: str, public: str | None = None):
        self.file = str(file)
        self.problem = problem
        self.public = public or problem
        super().__init__(f"{self.file}: {problem}")

    @property
    def public_message(self) -> str:
        return f"{self.file}: {self.public}"


class AdapterFileError(AdapterError):
    """The file system lacks or refuses an adapter's file or directory (missing, not a directory, not a
    regular file, unreadable). A server without --adapter-root answers a remote client no more than that
    there is no adapter it can read at the path the client gave, so answers do not map the server's files."""


class CapacityError(ExpertWeaveError):
    """Not enough adapter slots, table rows or physical memory; nothing was changed."""


class AdapterStateError(ExpertWeaveError):
    """An adapter name is unknown, already loaded, or busy."""


class MemoryBackendError(ExpertWeaveError):
    """A virtual-memory call was refused by the backend (bad size, double map, ...)."""


class ConfinementError(ExpertWeaveError):
    """A path leads outside the directory the server may read adapters from; nothing was read."""


class AdapterBusyError(AdapterStateError):
    """An adapter still has requests running or queued when its unload ran out of time; nothing was changed."""
