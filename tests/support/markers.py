"""Markers that say what a test needs, set from what the test uses (tests/conftest.py applies them).

* ``postgres``: the test (or a fixture it requests) uses ``postgres_url`` /
  ``postgres_admin``, or it is the ``postgresql`` parametrisation of ``any_db``
  (or of any parameter with that value).
* ``peers``: the test, one of its fixtures, or a function of the same module
  they call (followed through the module's globals) uses an entry point of
  tests/support that starts or calls a real peer: ``require`` (dcmtk,
  dicom3tools), ``orthanc``, ``start_node`` (``ainode serve`` as a subprocess,
  probed with echoscu), ``echo_ok``, ``wait_instances``.
* ``slow``: measured, not derivable; the tests in ``SLOW`` took 2 s or more on
  the 2-core machine (``pytest --durations=0``). Re-measure when adding a test
  that runs a pipeline, a subprocess or a training step.

Why derived rather than written on each test: a test reaches PostgreSQL by
asking for ``any_db`` (its second parametrisation) and a peer through a
helper, so a hand-written marker drifts from what the test does. The scan is
static, so each entry point also checks at run time (``needs``) that the
running test carries the marker: a use the scan missed fails with the fix in
its message instead of running in the fast tier.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import pytest

__all__ = ["PEER_ENTRY_POINTS", "SLOW", "apply_markers", "needs", "peer_entry", "running",
           "set_running"]

POSTGRES_FIXTURES = frozenset({"postgres_url", "postgres_admin"})

# Measured at 2 s or more (setup + call + teardown, ``--durations=0`` of the whole
# suite on the 2-core machine): ``file::function`` for every parametrisation, or
# one parametrisation's full id. tests/test_markers.py checks that each names a test.
SLOW: frozenset[str] = frozenset({
    # issue 21 (measured on the 2-core machine, --durations=0)
    "tests/test_operator_cli.py::test_fresh_data_dir_commands_create_the_schema",
    "tests/test_operator_cli.py::test_rule_without_condition_needs_catch_all_and_without_destination_warns",
    "tests/test_operator_cli.py::test_send_logs_each_outcome_with_its_reason_and_jobs_list_shows_it",
    "tests/test_operator_cli.py::test_render_of_undecodable_pixels_is_one_line",
    "tests/test_operator_cli.py::test_tables_fit_and_wide_shows_full_uids",
    "tests/test_operator_cli.py::test_serve_retries_an_unreachable_database_then_gives_up",
    "tests/test_operator_cli.py::test_config_show_masks_the_password",
    "tests/test_operator_cli.py::test_unreachable_postgresql_is_one_line_exit_1",
    "tests/test_operator_cli.py::test_help_shows_json_and_wide_as_flags",
    "tests/test_operator_view.py::test_every_object_says_research_use_and_the_sr_names_each_score_once",
    "tests/test_operator_view.py::test_jobs_show_names_and_rounds_each_score_as_the_sr_does",
    "tests/test_audit_chain.py::test_audit_verify_cli_exits_1_naming_the_edited_row",
    "tests/test_audit_chain.py::test_sealed_rows_are_forwarded_to_a_syslog_collector_over_tls",
    "tests/test_cli.py::test_help_lists_the_commands",
    "tests/test_cli.py::test_usage_errors_exit_2",
    "tests/test_config.py::test_cli_rejects_bad_config_with_exit_code_2",
    "tests/test_destinations.py::test_add_list_remove",
    "tests/test_destinations.py::test_config_destinations_are_synced_and_protected",
    "tests/test_destinations.py::test_duplicate_and_unknown_names_exit_2",
    "tests/test_destinations.py::test_echo",
    "tests/test_destinations.py::test_refused_input_exits_2",
    "tests/test_e2e.py::test_node_killed_mid_job_finishes_it_exactly_once_after_restart",
    "tests/test_e2e.py::test_phantom_study_round_trip_pacs_to_pacs",
    "tests/test_e2e.py::test_real_abdominal_ct_round_trip",
    "tests/test_evaluation.py::test_evaluate_writes_metrics_table_and_plots",
    "tests/test_ingest_network.py::test_a_dead_receiver_process_is_replaced",
    "tests/test_ingest_network.py::test_association_limit_is_the_nodes_across_receiver_processes",
    "tests/test_ingest_network.py::test_dead_and_silent_peers_free_their_association_slot",
    "tests/test_ingest_network.py::test_duplicate_is_acknowledged_once_and_conflict_is_kept_aside",
    "tests/test_ingest_network.py::test_echoscu_succeeds_and_an_unlisted_calling_ae_is_rejected",
    "tests/test_ingest_network.py::test_four_concurrent_storescu_processes_all_land",
    "tests/test_ingest_network.py::test_idle_associations_cost_the_node_no_cpu",
    "tests/test_ingest_network.py::test_low_disk_answers_out_of_resources_before_writing",
    "tests/test_ingest_network.py::test_sigkill_mid_transfer_loses_nothing_acknowledged",
    "tests/test_ingest_network.py::test_storescu_of_every_shared_series_lands_and_completes",
    "tests/test_ingest_network.py::test_unrepaired_files_with_empty_uids_get_a_failure_status",
    "tests/test_ingest_network.py::test_unsupported_sop_class_is_refused_at_negotiation",
    "tests/test_ingest_storage.py::test_series_completes_after_stable_age_and_reopens_on_late_instance[postgresql]",
    "tests/test_ingest_storage.py::test_series_is_stored_once_per_instance_with_rows_files_and_audit[sqlite]",
    "tests/test_jobs_cli.py::test_a_not_assessable_job_reports_only_its_verdict_and_is_counted",
    "tests/test_jobs_cli.py::test_reprocess_list_show_cancel_retry",
    "tests/test_models_bundle.py::test_bundle_works_as_stage1_of_the_pipeline",
    "tests/test_models_package.py::test_a_package_imported_into_models_dir_is_what_a_job_runs",
    "tests/test_models_package.py::test_torchscript_weights_load",
    "tests/test_one_preprocessing.py::test_training_jobs_and_evaluate_all_go_through_model_input",
    "tests/test_pancreas_pipeline.py::test_dicom_phantom_through_the_volume_loader",
    "tests/test_pancreas_pipeline.py::test_phantom_with_a_large_lesion_is_found_on_the_source_grid",
    "tests/test_pancreas_pipeline.py::test_real_ct_gives_a_roi_or_an_explicit_not_found",
    "tests/test_pancreas_pipeline.py::test_results_are_deterministic_on_cpu",
    "tests/test_pancreas_pipeline.py::test_run_gives_the_report_in_the_generic_contract",
    "tests/test_peers.py::test_orthanc_starts_and_answers_echo",
    "tests/test_phantom.py::test_lesion_appearance_follows_its_type[2]",
    "tests/test_phantom.py::test_pdac_dilates_the_upstream_duct",
    "tests/test_phantom.py::test_task07_layout_and_cases_csv",
    "tests/test_preprocess.py::test_clahe_changes_contrast_not_grid",
    "tests/test_preprocess.py::test_crop_to_foreground_with_margin",
    "tests/test_preprocess.py::test_n4_removes_a_known_bias_field",
    "tests/test_preprocess.py::test_provenance_records_every_step_and_is_json",
    "tests/test_preprocess.py::test_round_trip_axial_ct_real_pancreas_label",
    "tests/test_preprocess.py::test_round_trip_objects_land_on_the_same_voxels[mr_head_ge_3dt1-mr_t1]",
    "tests/test_preprocess.py::test_round_trip_objects_land_on_the_same_voxels[mr_head_philips_enhanced-mr_t1]",
    "tests/test_preprocess.py::test_round_trip_objects_land_on_the_same_voxels[mr_head_siemens_t1sag-mr_t1]",
    "tests/test_render.py::test_render_draws_outline_on_mask_edge",
    "tests/test_render.py::test_render_unknown_series_is_refused",
    "tests/test_rules_cli.py::test_console_script_exit_codes",
    "tests/test_rules_cli.py::test_refused_changes_to_an_existing_rule_exit_2",
    "tests/test_rules_cli.py::test_refused_input_exits_2",
    "tests/test_secrets.py::test_a_running_node_never_logs_its_database_password",
    "tests/test_secrets.py::test_database_password_from_a_file_or_the_environment",
    "tests/test_send.py::test_down_then_refusing_then_back_retried_with_backoff",
    "tests/test_send.py::test_echo_unreachable_raises",
    "tests/test_send.py::test_gives_up_after_max_attempts",
    "tests/test_send.py::test_orthanc_round_trip_all_four_kinds",
    "tests/test_send_retry_policy.py::test_an_hour_down_then_back_counted_attempts_and_delivery",
    "tests/test_storage_db.py::test_cli_db_upgrade",
    "tests/test_tls.py::test_sending_to_a_tls_destination_uses_the_profile",
    "tests/test_tls.py::test_tls_associations_in_both_receiver_processes",
    "tests/test_tls.py::test_tls_refusals_are_audited_and_a_silent_peer_blocks_nobody",
    "tests/test_training.py::test_head_finetune_changes_only_the_classifier",
    "tests/test_training.py::test_head_finetune_on_windows_of_its_own_set",
    "tests/test_training.py::test_refine_continues_the_whole_model_on_more_phantoms",
    "tests/test_training.py::test_stage1_and_slice_classifier_train",
    "tests/test_training.py::test_stage2_trains_checkpoints_and_resumes",
    "tests/test_training.py::test_time_budget_stops_training",
    "tests/test_training.py::test_window_features_follow_the_inference_windows",
    "tests/test_volume.py::test_geometry_matches_simpleitk_gdcm[ct_abdomen_siemens]",
    "tests/test_volume.py::test_geometry_matches_simpleitk_gdcm[mr_head_ge_3dt1]",
    "tests/test_worker.py::test_job_writes_outputs_and_findings_once",
    "tests/test_worker.py::test_missing_instances_fail_the_job",
    "tests/test_worker.py::test_sigkill_mid_job_then_restart_completes_exactly_once",
    "tests/test_worker.py::test_time_limit_fails_the_job",
    "tests/test_web.py::test_login_failures_are_audited_and_throttled_and_forms_need_csrf",
    "tests/test_web.py::test_users_cli_add_list_reset_token_remove",
    "tests/test_web_e2e.py::test_orthanc_stows_a_study_in_and_receives_the_results_by_stow",
    "tests/test_web_e2e.py::test_browser_sees_what_arrived_and_the_result_and_roles_hold",
    # issue 20 (readers' feedback; CLI subprocesses, measured on the 2-core machine)
    "tests/test_feedback_live.py::test_seeded_verdicts_from_cli_api_and_console_give_the_known_ppv",
    # issue 20 (drift monitoring; CLI subprocesses, measured on the 2-core machine)
    "tests/test_quality_records.py::test_qa_report_compares_by_scanner_and_qa_check_audits_and_exits_1",
})

# Filled by the ``peer_entry`` decorator (tests.support.peers, tests.support.node):
# the ids of the functions whose use means a real peer.
PEER_ENTRY_POINTS: set[int] = set()

P = ParamSpec("P")
R = TypeVar("R")

_running: list[pytest.Item] = []


def peer_entry(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark ``fn`` as a way to reach a real peer: found by the scan, checked when called."""
    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            needs("peers", what)
            return fn(*args, **kwargs)

        PEER_ENTRY_POINTS.update((id(fn), id(checked)))
        return checked

    return deco


def set_running(item: pytest.Item | None) -> None:
    _running[:] = [] if item is None else [item]


def running() -> pytest.Item | None:
    return _running[0] if _running else None


def needs(marker: str, what: str) -> None:
    """Fail the running test when it uses ``what`` without carrying ``marker``."""
    item = running()
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(f"{item.nodeid} uses {what} but is not marked {marker!r}: add "
                    f"@pytest.mark.{marker} to it (tests/support/markers.py derives the "
                    "marker from what it could see, and missed this use)", pytrace=False)


def _uses_peer(fn: Any, seen: set[int]) -> bool:
    """Whether ``fn`` refers to a peer entry point, directly or through same-module functions."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    module = getattr(fn, "__module__", None)
    glb: dict[str, Any] = getattr(fn, "__globals__", {})
    for name in _names(code):
        obj = glb.get(name)
        if obj is None:
            continue
        if id(obj) in PEER_ENTRY_POINTS:
            return True
        if (isinstance(obj, types.FunctionType) and obj.__module__ == module
                and _uses_peer(obj, seen)):
            return True
    return False


def _names(code: types.CodeType) -> Iterable[str]:
    """Global names used by ``code`` and the functions nested in it (lambdas, closures)."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _fixture_funcs(item: pytest.Item) -> Iterable[Any]:
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        for fixturedef in defs:
            yield fixturedef.func


def _wants_postgres(item: pytest.Item) -> bool:
    if POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "postgresql" in callspec.params.values()


def _is_slow(item: pytest.Item) -> bool:
    return item.nodeid in SLOW or item.nodeid.split("[", 1)[0] in SLOW


def apply_markers(items: list[pytest.Item]) -> None:
    for item in items:
        if _wants_postgres(item) and item.get_closest_marker("postgres") is None:
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("peers") is None:
            fn = getattr(item, "function", None)
            seen: set[int] = set()
            if any(_uses_peer(f, seen) for f in (fn, *_fixture_funcs(item)) if f is not None):
                item.add_marker(pytest.mark.peers)
        if _is_slow(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
