"""Reading the files of an adapter or a base checkpoint without trusting them: only regular files are
opened (a FIFO would block a server, a device or /proc file could be anything), JSON is read up to a
bound, and every failure of the operating system becomes one AdapterError naming the file."""

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import AdapterError, AdapterFileError, ConfinementError

MAX_JSON_BYTES = 1 << 20  # expert_cfg.json and config.json are a few KiB

FileIdentity = tuple[str, int, int, int, int, int]  # path, device, inode, size, mtime_ns, ctime_ns


def os_problem(error: OSError) -> str:
    """The operating system's own words for what went wrong ("Permission denied", ...)."""
    return (error.strerror or str(error)).rstrip(".")


def regular_file(path: Path) -> os.stat_result:
    """Stats path (following symlinks) and refuses anything but a non-empty regular file, never opening it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AdapterFileError(path, "missing") from None
    except OSError as e:
        raise AdapterFileError(path, f"cannot be read ({os_problem(e)})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise AdapterFileError(path, f"is {kind}, not a regular file; it was not read")
    if info.st_size == 0:
        raise AdapterFileError(path, "is empty (or a /proc-like file that reports no size); it was not read")
    return info


def open_regular(path: Path) -> BinaryIO:
    """Opens a file regular_file accepts; a FIFO or device swapped in after the stat is refused without
    blocking on it (O_NONBLOCK), and so is any other file swapped in."""
    before = regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AdapterFileError(path, f"cannot be read ({os_problem(e)})") from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise AdapterFileError(path, "was replaced while it was being opened; it was not read")
    return os.fdopen(fd, "rb")


def file_identity(path: Path, info: os.stat_result) -> FileIdentity:
    """What tells one version of a file from another, taken before its content is read: a copy made from
    it is stale when the file's identity is no longer this."""
    return str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def shown(name: str) -> str:
    """A name read from a file as a one-line message shows it: as is when plain, else as a Python string
    literal, so that spaces, control characters and look-alike digits are visible and cannot break the line."""
    return name if name.isascii() and name.isprintable() and " " not in name else ascii(name)


def directory(path: Path) -> list[Path]:
    """The entries of a directory, or one AdapterError saying why it cannot be listed."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise AdapterFileError(path, "not a directory")
        return sorted(path.iterdir())
    except FileNotFoundError:
        raise AdapterFileError(path, "not a directory (missing)") from None
    except OSError as e:
        raise AdapterFileError(path, f"cannot be listed ({os_problem(e)})") from None


def confined(root: Path, path: str) -> Path:
    """The adapter directory `path` (relative to root, or absolute) resolved, symlinks included, refusing
    it, or any file in it, that leads outside root: ConfinementError names neither what is outside nor
    whether it exists."""
    root = root.resolve()
    directory_path = (root / path).resolve()
    if not directory_path.is_relative_to(root):
        raise ConfinementError(f"adapter path {path!r} leads outside the adapter root; nothing was read")
    if directory_path.is_dir():
        for entry in directory(directory_path):
            if not entry.resolve().is_relative_to(root):
                raise ConfinementError(f"{entry.relative_to(root)} leads outside the adapter root; nothing was read")
    return directory_path


def read_bytes(path: Path, limit: int) -> bytes:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise AdapterError(path, f"is {size} bytes, more than the {limit} this file may hold; it was not read")
            return f.read(limit + 1)
    except OSError as e:
        raise AdapterFileError(path, f"cannot be read ({os_problem(e)})") from None


def parse_json(path: Path, data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys)
    except RepeatedKey as e:
        raise AdapterError(path, f"not valid JSON ({e})",
                           "not valid JSON (a key appears twice in one object)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise AdapterError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def read_json(path: Path) -> dict:
    return parse_json(path, read_bytes(path, MAX_JSON_BYTES))


class RepeatedKey(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A json.loads object_pairs_hook refusing repeated keys, which json.loads would take the last of: two
    entries for one thing, of which another reader may take the first."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise RepeatedKey(f"key {json.dumps(key)} appears twice in one object")
        seen.add(key)
    return dict(pairs)
