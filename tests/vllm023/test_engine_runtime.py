"""ExpertWeaveLLM's run-time adapter changes on vLLM 0.23, in this process (tests/test_vllm.py's tests on its
engine: load, serve and unload, addresses captured graphs read staying in place, refusals before and where
vLLM admits a request, unload waiting for running requests, a request id used again, and last, as there, a
plain engine beside it, whose shutdown ends this process's distributed state)."""

from test_vllm import engine, in_process_engine  # noqa: F401  (the main suite's fixtures and tests, in its order)
from test_vllm import test_runtime_load_serve_unload  # noqa: F401
from test_vllm import test_what_captured_graphs_read_stays_in_place  # noqa: F401
from test_vllm import test_unknown_adapter_is_refused_before_scheduling  # noqa: F401
from test_vllm import test_bad_adapter_load_changes_nothing  # noqa: F401
from test_vllm import test_vllm_admits_no_request_for_an_adapter_that_is_unknown_or_being_unloaded  # noqa: F401
from test_vllm import test_the_engine_refuses_every_forged_or_malformed_adapter_argument_and_keeps_running  # noqa: F401,E501
from test_vllm import test_unload_waits_for_running_requests_and_times_out_changing_nothing  # noqa: F401
from test_vllm import test_an_id_used_again_runs_with_its_new_adapter  # noqa: F401
from test_vllm import test_speculative_decoding_is_refused_before_anything_is_served  # noqa: F401
from test_vllm import test_another_engine_in_this_process_does_not_reach_the_weave  # noqa: F401
