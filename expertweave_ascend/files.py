"""Reading the files of an adapter or a base checkpoint without trusting them: only regular files are
opened (a FIFO would block a server, a device or /proc file could be anything), JSON is read up to a
bound, and every failure of the operating system becomes one AdapterError naming the file."""

import json
import os
import stat
from pathlib import Path

from .errors import AdapterError, ConfinementError

MAX_JSON_BYTES = 1 << 20  # expert_cfg.json and config.json are a few KiB


def os_problem(error: OSError) -> str:
    """The operating system's own words for what went wrong ("Permission denied", ...)."""
    return (error.strerror or str(error)).rstrip(".")


def regular_file(path: Path) -> os.stat_result:
    """Stats path (following symlinks) and refuses anything but a non-empty regular file, never opening it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise AdapterError(path, "missing") from None
    except OSError as e:
        raise AdapterError(path, f"cannot be read ({os_problem(e)})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise AdapterError(path, f"is {kind}, not a regular file; it was not read")
    if info.st_size == 0:
        raise AdapterError(path, "is empty (or a /proc-like file that reports no size); it was not read")
    return info


def directory(path: Path) -> list[Path]:
    """The entries of a directory, or one AdapterError saying why it cannot be listed."""
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise AdapterError(path, "not a directory")
        return sorted(path.iterdir())
    except FileNotFoundError:
        raise AdapterError(path, "not a directory (missing)") from None
    except OSError as e:
        raise AdapterError(path, f"cannot be listed ({os_problem(e)})") from None


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
    size = regular_file(path).st_size
    if size > limit:
        raise AdapterError(path, f"is {size} bytes, more than the {limit} this file may hold; it was not read")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise AdapterError(path, f"cannot be read ({os_problem(e)})") from None


def parse_json(path: Path, data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise AdapterError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def read_json(path: Path) -> dict:
    return parse_json(path, read_bytes(path, MAX_JSON_BYTES))
