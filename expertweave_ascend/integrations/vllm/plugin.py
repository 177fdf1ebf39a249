"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

It only installs hooks, on the model runner of this platform's vLLM (compat.engine_api()); they do
nothing unless the engine is started with `additional_config={"expertweave": {...}}` (what
ExpertWeaveLLM and `expertweave serve` pass).
"""


def register() -> None:
    from . import compat, worker

    compat.engine_api().patch_model_runner(worker.on_load, worker.on_schedule, worker.on_step)
