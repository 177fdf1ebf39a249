"""Wrapping an engine's methods in place, once, and finding them by name."""

import importlib
from typing import Callable


def resolve(target: str) -> tuple[object, str]:
    """(owner, attribute name) of "package.module:Qual.name": the module or class holding it."""
    module, qualname = target.split(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def lookup(target: str):
    return getattr(*resolve(target))


def replace_method(owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
    """Sets owner.name to make(original), once however often it is called."""
    original = getattr(owner, name)
    if getattr(original, "_expertweave", False):
        return
    replacement = make(original)
    replacement._expertweave = True
    replacement.__wrapped__ = original
    setattr(owner, name, replacement)


def wrap_after(owner: object, name: str, after: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self, *args, **kwargs)
            return result
        return wrapped

    replace_method(owner, name, make)


def wrap_before(owner: object, name: str, before: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            before(self, *args, **kwargs)
            return original(self, *args, **kwargs)
        return wrapped

    replace_method(owner, name, make)
