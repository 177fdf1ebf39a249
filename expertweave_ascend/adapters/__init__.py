"""ESFT adapters: open lazily, validate against a base, extract from a fine-tuned checkpoint, write."""

from .esft import EsftAdapter, read_expert_cfg, save_adapter
from .extract import extract_adapter
from .validate import check_adapter, validate_adapter

__all__ = ["EsftAdapter", "read_expert_cfg", "save_adapter", "extract_adapter", "check_adapter", "validate_adapter"]
