"""Per-layer rerouting tables and the reroute custom op."""

import importlib.util

import torch

from .reroute import reroute, reroute_reference, reroute_traced
from .table import RoutingTables

if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    from .reroute_triton import register_cuda

    register_cuda()

__all__ = ["reroute", "reroute_reference", "reroute_traced", "RoutingTables"]
