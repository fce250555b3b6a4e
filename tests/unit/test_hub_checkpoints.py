"""What Hub users bring: a Hub id resolved through the Hub cache (offline here), generation_config.json (eos ids
and sampling defaults) and the checkpoint's preprocessor pixel limits as the training defaults."""
import json

import numpy as np
import paddle
import pytest

from autoparallel.config import ConfigError, model_config
from autoparallel.data.dataset import build_processor
from autoparallel.engine.trainer import build_model, build_processor_for
from autoparallel.sharded_load import load_sharded
from launch.config import load_run_config
from launch.infer import Request, answer_batch, build_parser, infer_main, generation_config_from_args
from network.config import Qwen2VLConfig
from network.generation import CheckpointGenerationDefaults, GenerationConfig
from network.hub import resolve_model_dir
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.processor import Qwen2VLProcessor

HUB_ID = "Qwen/Qwen2-VL-2B-Instruct"
COMMIT = "895c3a49bc3fa70a340399125c650a463535e71c"
HUB_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                         "eos_token_id": [151645, 151643], "repetition_penalty": 1.0, "temperature": 0.01,
                         "top_p": 0.001, "top_k": 1, "transformers_version": "4.45.0.dev0"}
HUB_MAX_PIXELS = 12845056  # Qwen2-VL-*-Instruct preprocessor_config.json


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding a tiny model under HUB_ID, in huggingface_hub's layout (refs/main -> snapshot)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    paddle.seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.preset("tiny"))
    model.save_pretrained(str(snapshot), format="safetensors")
    processor = Qwen2VLProcessor.from_pretrained(None)
    processor.save_pretrained(str(snapshot))
    pre = json.loads((snapshot / "preprocessor_config.json").read_text())
    pre["max_pixels"] = pre["size"]["longest_edge"] = HUB_MAX_PIXELS
    (snapshot / "preprocessor_config.json").write_text(json.dumps(pre))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, snapshot, model


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache[0]))
    return hub_cache


def test_hub_id_resolves_through_the_cache_for_config_engine_and_infer(offline, capsys):
    cache, snapshot, model = offline
    assert resolve_model_dir(HUB_ID) == str(snapshot)
    assert model_config(HUB_ID) == Qwen2VLConfig.preset("tiny")
    cfg = load_run_config("sft", None, {"model_name_or_path": HUB_ID})
    built = build_model(cfg)  # lazy: filled from the resolved snapshot as Trainer.load_weights does
    load_sharded(built, resolve_model_dir(cfg.model.model_name_or_path))
    for (name, a), (_, b) in zip(built.state_dict().items(), model.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    args = ["--prompt", "Hi", "--max_new_tokens", "4", "--no-stream"]
    assert infer_main(["--model", HUB_ID, *args]) == 0
    by_id = capsys.readouterr().out
    assert infer_main(["--model", str(snapshot), *args]) == 0
    assert capsys.readouterr().out == by_id and by_id.strip()


def test_hub_id_missing_from_the_cache_is_one_clear_line(offline, capsys):
    cache = offline[0]
    missing = "Qwen/Qwen2-VL-72B-Instruct"
    with pytest.raises(ConfigError) as info:
        model_config(missing)
    for text in (repr(missing), str(cache), "HF_HUB_OFFLINE=1"):
        assert text in str(info.value)
    assert infer_main(["--model", missing, "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(missing) in err and str(cache) in err


def test_generation_config_eos_ids_stop_and_sampling_defaults_apply(tmp_path, hub_cache, capsys):
    _, snapshot, model = hub_cache
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in snapshot.iterdir():
        (model_dir / f.name).symlink_to(f)
    (model_dir / "generation_config.json").write_text(json.dumps(HUB_GENERATION_CONFIG))
    defaults = CheckpointGenerationDefaults.read(str(model_dir))
    assert defaults.eos_token_ids == (151645, 151643)
    assert defaults.sampling == {"temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.0}
    resolved = generation_config_from_args(build_parser().parse_args(["--model", "m"]), defaults)
    assert (resolved.temperature, resolved.top_k, resolved.top_p) == (0.01, 1, 0.001)
    resolved = generation_config_from_args(build_parser().parse_args(["--model", "m", "--temperature", "0"]), defaults)
    assert (resolved.temperature, resolved.top_k) == (0.0, 1)  # the command line wins, key by key

    # The tiny model's greedy answer, then the same request with that answer's first token declared an eos id
    # in generation_config.json: generation stops right there.
    processor = Qwen2VLProcessor.from_pretrained(str(snapshot))
    _, result = answer_batch(model, processor, [Request(0, "Hi", [], [])], GenerationConfig(max_new_tokens=6),
                             None, None)
    first = int(result.sequences[0, 0])
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 0, "prompt": "Hi"}) + "\n")

    def num_tokens(eos: list[int]) -> int:
        (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        out = tmp_path / "answers.jsonl"
        assert infer_main(["--model", str(model_dir), "--input", str(requests), "--output", str(out),
                           "--max_new_tokens", "6"]) == 0
        return json.loads(out.read_text())["num_tokens"]

    assert first not in (151645, 151643) and num_tokens([151645, 151643]) == 6
    assert num_tokens([151645, first]) == 1


def test_checkpoint_max_pixels_is_the_training_default(offline):
    sft = load_run_config("sft", None, {"model_name_or_path": HUB_ID})
    processor = build_processor(sft.data, processor=build_processor_for(sft))
    assert processor.image_processor.max_pixels == HUB_MAX_PIXELS  # as `infer --model` would use
    own = load_run_config("sft", None, {"model_name_or_path": HUB_ID, "max_pixels": 200704})
    assert build_processor(own.data, processor=build_processor_for(own)).image_processor.max_pixels == 200704
    preset = load_run_config("sft", None, {})  # a preset: HF's default
    assert build_processor(preset.data, processor=build_processor_for(preset)).image_processor.max_pixels == \
        Qwen2VLProcessor.from_pretrained(None).image_processor.max_pixels
