"""What ExpertWeave replaces in vLLM, against vLLM 0.23 (tests/test_patches.py's tests: every row of
patching.PATCHES made on 0.23 resolves here, each platform's own targets are its rows, a target outside the
table is refused, and an engine carries no replacement the table does not list)."""

from test_patches import served  # noqa: F401  (the main suite's fixture and tests, in its order)
from test_patches import test_the_table_is_well_formed  # noqa: F401
from test_patches import test_each_target_resolves_in_this_vllm  # noqa: F401
from test_patches import test_the_front_end_rows_name_the_module_vllms_api_server_builds_its_app_in  # noqa: F401
from test_patches import test_each_platform_wraps_exactly_its_rows  # noqa: F401
from test_patches import test_platform_objects_hold_no_state  # noqa: F401
from test_patches import test_a_target_outside_the_table_is_refused  # noqa: F401
from test_patches import test_an_object_is_patched_once_and_only_that_object  # noqa: F401
from test_patches import test_an_engine_carries_only_replacements_the_table_lists  # noqa: F401
from test_patches import test_a_replacement_made_around_the_table_is_found  # noqa: F401
