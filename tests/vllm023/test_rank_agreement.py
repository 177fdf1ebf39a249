"""Rank agreement (I7) in ExpertWeaveLLM on vLLM 0.23 at tensor parallelism 2: tests/test_vllm_tp.py's tests,
run again on this line's engine (its collective RPCs answering per rank, a function injected into both
workers)."""

from test_vllm_tp import (  # noqa: F401  (the main suite's tests and their engine)
    engine,
    test_a_load_that_fails_on_rank_1_is_undone_on_rank_0,
    test_a_load_every_rank_agrees_on_serves_and_unloads_everywhere,
)
