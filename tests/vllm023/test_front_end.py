"""The front-end's hooks into vLLM's app, the plugin groups it leaves alone and the API-server process importing
no model runner, on vLLM 0.23 (tests/test_frontend.py's tests; the main suite runs them on 0.32); and data
parallelism refused before any engine starts, in every spelling vLLM 0.23's parser accepts
(tests/test_data_parallel.py's tests)."""

from test_data_parallel import (  # noqa: F401  (the main suite's tests, run here on vLLM 0.23)
    test_expertweave_llm_refuses_data_parallelism_before_an_engine_starts,
    test_expertweave_llm_starts_one_engine,
    test_serve_refuses_each_spelling_of_data_parallelism_before_the_server_starts,
    test_serve_reads_one_engine,
    test_serve_refuses_data_parallelism_asked_by_the_environment,
    test_the_serve_command_refuses_data_parallelism_in_one_error_line,
    test_what_vllms_parser_refuses_or_answers_is_its_own_answer,
    test_vllm_ascend_refuses_a_data_parallel_moe_layer_at_engine_start,
)
from test_frontend import (  # noqa: F401  (the main suite's tests, run here on vLLM 0.23)
    test_add_front_end_wraps_build_app_and_init_app_state,
    test_serve_leaves_the_plugin_groups_as_the_user_set_them,
    test_the_api_server_process_imports_no_model_runner,
    test_no_endpoint_plugin_is_registered,
    test_serve_starts_this_projects_api_server_module,
    test_expertweaves_processors_are_added_once_beside_the_users_own,
)
