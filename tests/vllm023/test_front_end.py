"""The front-end's hooks into vLLM's app, the plugin groups it leaves alone and the API-server process importing
no model runner, on vLLM 0.23 (tests/test_frontend.py's tests; the main suite runs them on 0.32)."""

from test_frontend import (  # noqa: F401  (the main suite's tests, run here on vLLM 0.23)
    test_add_front_end_wraps_build_app_and_init_app_state,
    test_serve_leaves_the_plugin_groups_as_the_user_set_them,
    test_the_api_server_process_imports_no_model_runner,
    test_no_endpoint_plugin_is_registered,
    test_serve_starts_this_projects_api_server_module,
    test_expertweaves_processors_are_added_once_beside_the_users_own,
)
