"""ESFT adapters: open lazily, validate against a base, extract from a fine-tuned checkpoint, write."""

from .esft import EsftAdapter, save_adapter
from .extract import extract_adapter
from .validate import validate_adapter

__all__ = ["EsftAdapter", "save_adapter", "extract_adapter", "validate_adapter"]
