"""The V1 model runner's seams, which every platform hooks the same way: vLLM 0.23's and 0.32's runners
(CPUModelRunner, GPUModelRunner) and vllm-ascend's NPUModelRunner, which overrides all three methods.

| what                       | V1 model runner (vLLM 0.23, 0.32, vllm-ascend 0.23)                  |
| -------------------------- | -------------------------------------------------------------------- |
| model loaded               | `load_model`                                                         |
| request scheduled/finished | `execute_model(scheduler_output)`: `scheduled_new_reqs`, `finished_req_ids` |
| per-step token layout      | private `_prepare_inputs(scheduler_output, num_scheduled_tokens)`: `input_batch.req_ids` order, `query_start_loc` |

The per-step rows must be written before the forward starts, outside it: the device graphs vLLM (and
vllm-ascend) capture replay the reroute kernel on the buffers it read at capture, and no Python runs then.
vLLM offers no public point between laying out the batch and running the forward, hence the one private
method; each suite runs it on its vLLM line. Every method wrapped is a row of patching.PATCHES.
"""

import numpy as np
import torch

from ....errors import ExpertWeaveError
from ..engine import OnLoad, OnSchedule, OnStep, expertweave_config
from ..patching import wrap_after, wrap_before


class V1Runner:
    MODEL_RUNNER: str  # "module:Class" of the V1 runner this platform's worker builds
    MODEL_RUNNER_V2: str | None = None  # "module:Class" of the line's Model Runner V2, refused where it exists
    LOAD_MODEL, EXECUTE_MODEL, PREPARE_INPUTS = "load_model", "execute_model", "_prepare_inputs"

    def before_runner_import(self) -> None:
        """What must run before the platform's model runner module is imported (nothing by default)."""

    def patch_model_runner(self, on_load: OnLoad, on_schedule: OnSchedule, on_step: OnStep) -> None:
        self.before_runner_import()
        runner = self.MODEL_RUNNER
        wrap_after(f"{runner}.{self.LOAD_MODEL}", lambda self, *a, **k: on_load(self))
        wrap_before(f"{runner}.{self.EXECUTE_MODEL}",
                    lambda self, scheduler_output, *a, **k: on_schedule(self, scheduler_output))
        wrap_after(f"{runner}.{self.PREPARE_INPUTS}", lambda self, *a, **k: on_step(self))
        if self.MODEL_RUNNER_V2 is not None:
            wrap_after(f"{self.MODEL_RUNNER_V2}.{self.LOAD_MODEL}", lambda self, *a, **k: refuse_model_runner_v2(self))

    def loaded_model(self, runner) -> torch.nn.Module:
        return runner.model

    def batch_layout(self, runner) -> tuple[list[str], np.ndarray]:
        """The runner's batch once `_prepare_inputs` laid it out: request ids in batch order, tokens per
        request."""
        n = runner.input_batch.num_reqs
        return list(runner.input_batch.req_ids[:n]), np.diff(runner.query_start_loc.np[: n + 1])


def refuse_model_runner_v2(runner) -> None:
    if expertweave_config(runner) is not None:
        raise ExpertWeaveError("ExpertWeave hooks vLLM's V1 model runner, and this engine runs Model Runner V2: "
                               "start it with VLLM_USE_V2_MODEL_RUNNER=0 (expertweave serve and ExpertWeaveLLM "
                               "set it unless it is set)")
