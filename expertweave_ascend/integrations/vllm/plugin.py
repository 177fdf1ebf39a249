"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

It only installs hooks; they do nothing unless the engine is started with
`additional_config={"expertweave": {...}}` (what ExpertWeaveLLM and `expertweave serve` pass).
"""


def register() -> None:
    from . import compat, worker

    compat.patch_model_runner(worker.on_load, worker.on_step, worker.on_request_removed)
