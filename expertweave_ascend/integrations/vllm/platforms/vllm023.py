"""What vLLM 0.23 offers ExpertWeave beyond its MoE layer, shared by the 0.23 CPU platform (cpu023.py) and
vllm-ascend 0.23 (ascend.py), which runs vLLM 0.23's runner seams, scheduler and front-end: what the 0.23
suite runs on the CPU is what an Atlas server runs on vLLM's side.

| what                     | vLLM 0.23                                                        |
| ------------------------ | ---------------------------------------------------------------- |
| model runner             | the V1 runner's seams (runner.py); vllm-ascend's NPUModelRunner overrides all three |
| scheduler queues         | `waiting`, `skipped_waiting`; running requests bounded by `max_num_running_reqs`; `finish_requests` returns (request id, client index) |
| `vllm serve`'s arguments | `vllm.entrypoints.openai.cli_args` (0.23 has no `vllm.entrypoints.launchers`) |
| returned routed experts  | `model_config.enable_return_routed_experts` (V1 runner too): they would be slots |
| scheduling               | asynchronous by default on devices (`--no-async-scheduling` turns it off); the CPU platform is synchronous |
"""

from ....errors import ExpertWeaveError
from .runner import V1Runner


class Vllm023(V1Runner):
    name: str
    VLLM_LINE = "0.23"
    SCHEDULER_WAITING = ("waiting", "skipped_waiting")
    SCHEDULER_SEATS = "max_num_running_reqs"
    CLI_ARGS = "vllm.entrypoints.openai.cli_args"

    @staticmethod
    def finished_request_id(finished) -> str:
        """The id of one of the requests Scheduler.finish_requests returns (vLLM 0.23: (id, client index))."""
        return finished[0]

    def check_engine(self, runner, max_adapters: int) -> None:
        if runner.vllm_config.model_config.enable_return_routed_experts:
            raise ExpertWeaveError(f"ExpertWeave on vLLM {self.name}: enable_return_routed_experts would return "
                                   "expert slots, not expert ids (rerouting rewrites them before the capture); "
                                   "start without it")
