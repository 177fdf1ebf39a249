"""The adapters a server may serve by name: NAME=PATH entries and every subdirectory of an adapter root
(named after its directory). Any number of them; only the ones requests use are loaded (residency.py)."""

from pathlib import Path

from .adapters.esft import CFG_NAME, EsftAdapter
from .errors import ExpertWeaveError
from .files import confined


class AdapterCatalogue:
    def __init__(self, root: str | Path | None = None, named: dict[str, str | Path] | None = None):
        self.root = None if root is None else Path(root)
        self.named = {name: Path(path) for name, path in (named or {}).items()}

    def path(self, name: str) -> Path | None:
        """Where the adapter of this name lives, or None when the catalogue has no such adapter. A name
        under the root is one directory below it: no separators, no dot names, nothing leading outside."""
        if name in self.named:
            return self.named[name]
        if self.root is None or not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
            return None
        try:
            if not (self.root / name / CFG_NAME).is_file():
                return None
        except OSError:  # a name no file can have (too long), or a directory that cannot be read
            return None
        return confined(self.root, name)

    def tunes_non_experts(self, name: str) -> bool | None:
        """Whether the named adapter also tunes non-expert modules, read from its files without loading it
        (None: not in the catalogue, or unreadable, which loading it reports)."""
        try:
            path = self.path(name)
            return None if path is None else EsftAdapter.open(path).non_expert_modules
        except ExpertWeaveError:
            return None

    def names(self) -> list[str]:
        found = set(self.named)
        if self.root is not None and self.root.is_dir():
            found |= {d.name for d in self.root.iterdir()
                      if not d.name.startswith(".") and (d / CFG_NAME).is_file()}
        return sorted(found)

    def __contains__(self, name: str) -> bool:
        return self.path(name) is not None
