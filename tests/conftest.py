"""Test-wide setup: 8 CPU devices, so sharding is tested on any machine.

JAX_PLATFORMS=cpu: where the [preflight] extra is installed, the CUDA and TPU plugins would
otherwise try (and fail, noisily) to start on this accelerator-less machine.

A compilation cache for the session: many tests (and the processes they start: main.py, the
multihost workers, the notebook's kernel) compile the same steps (the default FC's init, eval,
masks and counts above all), and compiling is most of the suite's time. The cache lives in a new
temporary directory per `pytest` command, shared by its xdist workers and subprocesses through
the environment and removed at the end, so no run ever reads another's entries. A hit loads the
executable XLA compiled for the same program and options: the tests run the same code either way.
Set JAX_COMPILATION_CACHE_DIR yourself to use (and keep) another directory.
"""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="edgepopup-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# Two tiers: `make test` runs the fast one (-m "not slow"), `make test-all` (and CI) everything.
# Slow: tests that run whole trainings (or many of them), several processes, deviceless
# compiles, the notebook, or compile big models; by node-id prefix (file::name[params]), so a
# parametrized test can keep its cheap cases fast (and by @pytest.mark.slow in a test file:
# test_configs' one-step runs outside its FAST set). Each module keeps fast tests. A prefix that
# matches no test of a collected file is an error, so a rename cannot move a test silently.
SLOW = (
    # several processes
    "test_multihost.py::", "test_packaging.py::test_trainer_step_runs_without_tensorflow",
    "test_packaging.py::test_library_works_without_the_trainer_dependencies",
    "test_train.py::test_sigterm_saves", "test_train.py::test_cli_exits_1",
    "test_export_evaluate.py::",
    # the notebook
    "test_notebooks.py::",
    # deviceless compiles
    "test_preflight.py::test_conv4_compiles", "test_preflight.py::test_cli_absurd_batch",
    "test_preflight.py::test_a_group_of_runs_compiles",
    # whole trainings, or trainings on many device counts / options / configs
    "test_option_combinations.py::test_option_combination_trains_evaluates_and_exports",
    "test_train.py::test_any_device_count", "test_train.py::test_supermask_sample_evaluation",
    "test_train.py::test_default_config_learns_mnist5k",
    "test_train.py::test_frozen_weights_do_not_change", "test_train.py::test_incompatible_checkpoint",
    "test_sweep.py::test_sweep_stops_resumes", "test_sharding.py::test_fsdp_state_is_split",
    "test_selection.py::test_trainer_runs_the_global_scope",
    "test_parallel.py::test_devices_split", "test_parallel.py::test_sweep_trains",
    "test_parallel.py::test_group_resumes_from_the_newest",
    "test_bad_images.py::test_tf_data_error_names_the_file",
    "test_bad_images.py::test_skip_trains_on_the_rest",
    "test_bad_images.py::test_more_bad_than_max_bad_fraction_stops_naming_the_files[tf_data",
    # big models, compiled
    "test_subnet.py::test_cifar_resnet18_roundtrip", "test_interop.py::test_cresnet18_import",
    # training in lockstep with the torch re-creation of the reference: the ResNet, and the
    # planted differences (each compiles its own step); Conv4's agreement stays fast
    "test_interop.py::test_training_matches_reference_step_by_step[cResNet18]",
    "test_interop.py::test_planted_difference_is_caught",
    "test_models.py::test_cifar_resnet18_forward_train_and_eval",
    "test_selection.py::test_batched_selection_equals_the_sort_for_every_layer_of_every_model[resnet",
    "test_selection.py::test_batched_selection_equals_the_sort_for_every_layer_of_every_model[wide",
    "test_selection.py::test_batched_selection_equals_the_sort_for_every_layer_of_every_model[cifar",
    "test_selection.py::test_selection_split_over_8_devices",
    "test_selection.py::test_selection_on_split_scores",
    "test_selection.py::test_search_is_exact_at_the_ends_of_the_key_range[3",
    "test_selection.py::test_search_is_exact_at_the_ends_of_the_key_range[15",
    "test_mask_selection.py::test_methods_match_reference_bf16",
    "test_mask_selection.py::test_methods_match_reference[70001",
    "test_mask_selection.py::test_methods_match_reference_large",
    "test_selection.py::test_masks_collection_gives_the_layers_own_masks_and_gradients",
    "test_selection.py::test_evaluation_folds_the_masks_into_the_kernels_once",
    "test_selection.py::test_global_scope_equals_a_sort_over_the_concatenated_scores",
    "test_selection.py::test_global_scope_needs_the_masks_collection",
    "test_models.py::test_grad_only_scores_conv4",
    # faults met through main.py: a corrupt checkpoint, a full disk, a CPU machine's plugins
    "test_faults.py::test_cli_", "test_platforms.py::test_main_prints_no_traceback",
    "test_workdir_lock.py::test_cli_",
    # the follow-up methods' groups
    "test_followups.py::test_schedules_scopes_and_iterand", "test_iterand.py::test_iterand_resumes",
    "test_sparsity.py::test_a_scheduled_run_takes", "test_finetune.py::test_fine_tuning_resumes",
    "test_followups.py::test_each_layer_option",
    "test_transform.py::test_transformed_vit_trains_with_a_schedule_iterand_and_finetune",
    # one loop, any source
    "test_sources.py::test_each_follow_up_trains_from_a_folder",
    "test_sources.py::test_a_follow_up_on_tf_data_resumes", "test_sources.py::test_parallel_runs_on_tf_data",
    "test_sources.py::test_one_run_two_sources",
)


# Under xdist (`make test` runs -n 2) the tests are handed out in collection order; these, the
# longest (tens of seconds to a minute each on 2 cores), go first so that no worker is left idle
# at the end while the other still runs one of them. Only the order changes: a name that stops
# matching merely loses its place. The slow ones lead their group.
LONG_FIRST = (
    "test_multihost.py::",
    "test_configs.py::test_config_trains_one_step[imagenet",
    "test_configs.py::test_config_trains_one_step[cifar10_resnet18",
    "test_train.py::test_any_device_count_trains_evaluates_checkpoints_and_resumes",
    "test_notebooks.py::",
    "test_export_evaluate.py::",
    "test_preflight.py::test_conv4_compiles",
    "test_sweep.py::test_sweep_stops_resumes_skips_and_tabulates",
    "test_sharding.py::test_fsdp_state_is_split",
    "test_interop.py::test_cresnet18_import_matches_reference",
    "test_packaging.py::test_trainer_step_runs_without_tensorflow",
)


def _long_first_rank(item):
    name = _name(item)
    rank = next((i for i, prefix in enumerate(LONG_FIRST) if name.startswith(prefix)), len(LONG_FIRST))
    return rank, item.get_closest_marker("slow") is None


def _name(item) -> str:
    return item.nodeid.rsplit("/", 1)[-1]


def pytest_collection_modifyitems(config, items):
    files = {_name(item).split("::")[0] for item in items}
    unmatched = [p for p in SLOW if p.split("::")[0] in files
                 and not any(_name(item).startswith(p) for item in items)]
    chosen = config.option.keyword or config.option.deselect or any("::" in a for a in config.args)
    if unmatched and not chosen:
        raise pytest.UsageError(f"conftest.SLOW names tests that do not exist: {unmatched}")
    for item in items:
        if any(_name(item).startswith(p) for p in SLOW):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_long_first_rank)  # stable: the rest keep their order
