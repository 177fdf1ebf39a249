"""Engines side by side in one process on vLLM 0.23 (tests/test_engines_in_one_process.py's tests: two
ExpertWeave engines with different adapters, compiled, their calls interleaved, and last a plain engine
beside one of them, whose shutdown ends this process's distributed state)."""

from test_engines_in_one_process import engines, in_process_engine, references  # noqa: F401  (fixtures)
from test_engines_in_one_process import test_each_engine_has_its_own_weave_and_adapters  # noqa: F401
from test_engines_in_one_process import test_interleaved_calls_serve_each_engines_own_adapters  # noqa: F401
from test_engines_in_one_process import test_an_engine_serves_no_adapter_of_the_other  # noqa: F401
from test_engines_in_one_process import test_loading_and_unloading_in_one_engine_leaves_the_other_as_it_was  # noqa: F401,E501
from test_engines_in_one_process import test_a_plain_engine_beside_an_expertweave_engine_keeps_to_itself  # noqa: F401,E501
