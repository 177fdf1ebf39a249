"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

It only installs hooks, on the model runner of this process's engine platform (platforms.current()); they do
nothing unless the engine is started with `additional_config={"expertweave": {...}}` (what
ExpertWeaveLLM and `expertweave serve` pass).
"""


def register() -> None:
    from . import platforms, worker

    platforms.current().patch_model_runner(worker.on_load, worker.on_schedule, worker.on_step)
