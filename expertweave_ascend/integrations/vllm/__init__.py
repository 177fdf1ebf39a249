"""vLLM integration: a worker extension that hooks the model runner, a MoE layer handle, an offline wrapper
and the HTTP front-end.

Everything that differs between vLLM lines and devices lives in one platform class (platforms/), behind
the engine interface of engine.py.
"""
