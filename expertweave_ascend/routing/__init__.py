"""Per-layer rerouting tables and the reroute custom op."""

from .reroute import reroute, reroute_reference
from .table import RoutingTables

__all__ = ["reroute", "reroute_reference", "RoutingTables"]
