"""vLLM integration: a general plugin, a MoE layer handle, a worker extension and an offline wrapper.

Every detail that differs between vLLM versions lives in compat.py.
"""
