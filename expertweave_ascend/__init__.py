"""ExpertWeave: many ESFT adapters of one MoE model, served at the memory cost of one base model."""

__version__ = "0.1.0"
