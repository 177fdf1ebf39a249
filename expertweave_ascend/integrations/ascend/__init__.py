"""Ascend NPU integration: what runs beside torch_npu and vllm-ascend on an Atlas server."""
