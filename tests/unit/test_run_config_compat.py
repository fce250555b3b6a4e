"""PaddleMIX script arguments in the run config: compatibility-only keys (one notice), keys that mean something
here, LoRA keys on sft, the data-parallel degree derived from the world size, and the launcher flags."""
import re

import pytest

from autoparallel.config import COMPATIBILITY_ONLY, SECTIONS, ConfigError, RunConfig
from launch.config import parse_overrides
from launch.launcher import WorkerLaunch, split_launch_options
from launch.prepare import check_launch_options, prepare_run

PADDLEMIX_ONLY = ["do_train", "enable_auto_parallel", "use_intermediate_api", "to_static",
                  "auto_parallel_resume_form_hybrid_parallel", "overwrite_output_dir", "logging_dir", "report_to",
                  "save_strategy", "optim", "hybrid_parallel_topo_order", "fp16_opt_level"]


def build(command="sft", **layer):
    return RunConfig.build(command, [("command line", layer)])


def test_compatibility_only_keys_are_accepted_listed_once_and_change_nothing():
    given = {"do_train": "true", "enable_auto_parallel": "1", "use_intermediate_api": "true", "to_static": "0",
             "auto_parallel_resume_form_hybrid_parallel": "true", "overwrite_output_dir": "True",
             "logging_dir": "work/logs", "report_to": "visualdl", "save_strategy": "steps", "optim": "adamw",
             "hybrid_parallel_topo_order": "sharding_first", "fp16_opt_level": "O2"}
    cfg = build(**given)
    assert cfg.compatibility_keys == PADDLEMIX_ONLY
    notice = cfg.compatibility_notice()
    assert "\n" not in notice and all(key in notice for key in PADDLEMIX_ONLY)
    assert cfg.to_flat_dict() == build().to_flat_dict()  # no effect on any section
    assert build().compatibility_notice() is None


def test_compatibility_keys_are_data_and_not_schema_keys():
    schema = {f for cls in SECTIONS.values() for f in cls.__dataclass_fields__}
    assert set(PADDLEMIX_ONLY) <= set(COMPATIBILITY_ONLY) and not schema & set(COMPATIBILITY_ONLY)


@pytest.mark.parametrize("key,value,message", [
    ("optim", "sgd", "optim='sgd' (command line): only adamw"),
    ("to_static", "1", "to_static='1' (command line): only 0, false"),
    ("fp16_opt_level", "O1", "only O2"),
    ("save_strategy", "epoch", "only steps"),
    ("fp16", "true", "fp16: true is not supported"),
])
def test_keys_with_unsupported_values_are_clear_errors(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build(**{key: value})


def test_keys_that_mean_something_are_honoured():
    cfg = build(bf16="True", fp16="False", amp_master_grad="1", sep_parallel_degree="2")
    assert cfg.model.bf16 and not cfg.model.fp16 and cfg.model.amp_master_grad
    # #32: PaddleMIX's sep_parallel_degree (and ms-swift's sequence_parallel_size) is context parallel.
    assert cfg.parallel.context_parallel_degree == 2 and cfg.parallel.degrees().cp == 2
    assert build(sequence_parallel_size="2").parallel.degrees().world_size == 2


def test_sft_with_lora_true_trains_lora_and_lora_keys_are_typed():
    cfg = build("sft", lora="True", lora_rank="12", lora_alpha="256", lora_dropout="0.0",
                lora_target_modules="model.layers.*q_proj.*,model.layers.*o_proj.*")
    assert cfg.uses_lora and (cfg.lora.lora_rank, cfg.lora.lora_alpha) == (12, 256)
    assert cfg.lora.lora_target_modules == ["model.layers.*q_proj.*", "model.layers.*o_proj.*"]
    assert not build("sft").uses_lora and build("lora").uses_lora and not build("lora", lora="false").uses_lora


@pytest.mark.parametrize("layer,world,dp", [
    ({}, 2, 2), ({"tensor_parallel_degree": 2}, 2, 1), ({"sharding_parallel_degree": 2}, 4, 2),
    ({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}, 8, 2),
])
def test_data_parallel_degree_is_derived_from_the_world_size(layer, world, dp):
    cfg = build(**layer)
    cfg.parallel.resolve_data_parallel(world)
    assert cfg.parallel.data_parallel_degree == dp and cfg.parallel.degrees().world_size == world


def test_a_world_that_fits_no_data_parallel_degree_is_an_error():
    cfg = build(tensor_parallel_degree=2)
    with pytest.raises(ValueError, match="3 processes are not a multiple of tensor x pipeline x sharding"):
        cfg.parallel.resolve_data_parallel(3)


def run_config_of(tmp_path, argv):
    launch, config, rest = split_launch_options(argv)
    return prepare_run("sft", config, ["--output_dir", str(tmp_path / "out"), "--synthetic_data_dir",
                                       str(tmp_path / "syn"), *rest], launch)


def test_demo_preset_takes_tensor_parallel_on_its_two_processes(tmp_path):
    from launch.config import load_resolved

    path, nproc, _ = run_config_of(tmp_path, ["--nproc_per_node", "2", "--tensor_parallel_degree", "2"])
    cfg = load_resolved("sft", path)
    assert nproc == 2 and (cfg.parallel.data_parallel_degree, cfg.parallel.tensor_parallel_degree) == (1, 2)
    path, nproc, _ = run_config_of(tmp_path, [])  # `qwen2vl-ap sft`: the demo's 2 processes, dp 2
    assert nproc == 2 and load_resolved("sft", path).parallel.data_parallel_degree == 2
    # an explicit degree that does not fit stays an error
    with pytest.raises(ConfigError, match="world size"):
        run_config_of(tmp_path, ["--nproc_per_node", "2", "--tensor_parallel_degree", "2",
                                 "--data_parallel_degree", "2"])


def test_paddlemix_launcher_flags():
    argv = ["--master", "127.0.0.1:8080", "--nnodes", "1", "--nproc_per_node", "2", "--rank", "0", "--ips",
            "127.0.0.1", "--run_mode=collective", "--gpus", "0,1", "--log_dir", "x", "--learning_rate", "1e-5"]
    launch, config, rest = split_launch_options(argv)
    assert launch == {"master": "127.0.0.1:8080", "nnodes": "1", "nproc_per_node": "2", "rank": "0",
                      "ips": "127.0.0.1", "run_mode": "collective", "devices": "0,1", "log_dir": "x"}
    assert config is None and parse_overrides(rest) == {"learning_rate": "1e-5"}
    check_launch_options(launch)
    cmd = WorkerLaunch("w.py", [], 2, "logs", launch).command()
    assert cmd[cmd.index("--ips") + 1] == "127.0.0.1" and cmd[cmd.index("--run_mode") + 1] == "collective"
    assert "--devices" not in cmd  # a CPU build has no device ids; their count set nproc_per_node
    for bad, message in ((dict(run_mode="ps"), "only collective"),
                         (dict(devices="0,1,2", nproc_per_node="2"), "disagrees with --devices"),
                         (dict(ips="10.0.0.1,10.0.0.2", nnodes="3"), "lists 2 nodes but --nnodes is 3")):
        with pytest.raises(ConfigError, match=message):
            check_launch_options(bad)
    check_launch_options({"ips": "10.0.0.1,10.0.0.2"})  # two nodes from --ips, no --master needed


def test_devices_set_the_process_count(tmp_path):
    _, nproc, _ = run_config_of(tmp_path, ["--devices", "0,1"])
    assert nproc == 2


def test_override_values_keep_their_dashes():
    """Dashes in a key mean underscores (`--max-steps`); a value given with `=` is a path or a name and keeps them."""
    assert parse_overrides(["--output-dir=/tmp/run-1", "--model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct",
                            "--log-dir", "a-b"]) == {"output_dir": "/tmp/run-1",
                                                     "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
                                                     "log_dir": "a-b"}
