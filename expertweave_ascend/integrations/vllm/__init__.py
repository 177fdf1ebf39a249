"""vLLM integration: a general plugin, a MoE layer handle, a worker extension, an offline wrapper and
the HTTP front-end.

Everything that differs between vLLM lines and devices lives in one platform class (platforms/), behind
the engine interface of engine.py.
"""
