"""`qwen2vl-ap demo`: the whole user journey on the embedded tiny default, on CPU.

train (2 processes, auto-parallel; preset `tiny_demo`: held-out exact match evaluated at every eval step, `best`
kept on the best checkpoint) → merge the best checkpoint → answer held-out questions with the merged model, and
compare accuracy with the untrained model (same seed, same initial weights).
"""
from __future__ import annotations

import json
from pathlib import Path

from network.log import logger

EVAL_QUESTIONS = 96
PRESET = "tiny_demo"  # a --config on the command line replaces it


def _accuracy(model_dir: str | None, config_name: str, synthetic_dir: str, seed: int) -> float:
    """exact_match of greedy answers to the first EVAL_QUESTIONS held-out questions (`qwen2vl-ap eval`'s code)."""
    import paddle

    from autoparallel.data import DataConfig, SFTDataset
    from autoparallel.data.synthetic import eval_meta_path
    from autoparallel.engine.evaluation import eval_records, predict, prediction_rows, score_rows, stop_token_ids
    from network.config import Qwen2VLConfig
    from network.generation import GenerationConfig
    from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from network.processor import Qwen2VLProcessor

    if model_dir is None:  # the untrained model: the engine's initial weights (same seed, same init order)
        paddle.seed(seed)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.preset(config_name))
        processor = Qwen2VLProcessor.from_pretrained(None)
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
        processor = Qwen2VLProcessor.from_pretrained(model_dir)
    model.eval()
    dataset = SFTDataset(DataConfig(meta_path=eval_meta_path(synthetic_dir)), processor=processor)
    records = eval_records(dataset, EVAL_QUESTIONS)
    # One-word answers: a few tokens, then <|im_end|>.
    config = GenerationConfig(max_new_tokens=8, stop_token_ids=stop_token_ids(processor, model.config))
    rows = prediction_rows(records, predict(model, dataset, records, config, batch_size=16))
    accuracy = score_rows(rows, ["exact_match"])["exact_match"]
    for row in rows[:3]:
        logger.info("question %r: expected %r, answered %r", row["prompt"], row["reference"], row["prediction"])
    logger.info("held-out exact_match %.3f (%d questions)", accuracy, len(rows))
    return accuracy


def _in_training_evaluation(records: list[dict], cfg: dict, merged_name: str) -> str | None:
    """The console line for the in-training generation metric: first evaluation -> best (the merged checkpoint)."""
    key = "eval_" + str(cfg.get("metric_for_best_model", "")).removeprefix("eval_")
    evals = [(r["step"], r[key]) for r in records if key in r]
    if not evals or key == "eval_loss":
        return None
    best_step, best = max(evals, key=lambda e: e[1])  # the first of equal values, as the trainer's `best`
    first_step, first = evals[0]
    return (f"held-out {key.removeprefix('eval_')} during training ({cfg.get('eval_max_samples')} questions): "
            f"{first:.1%} at step {first_step} -> best {best:.1%} at step {best_step} ({merged_name})")


def demo_main(argv: list[str]) -> int:
    from autoparallel.config import RUN_CONFIG_FILE
    from autoparallel.engine.checkpoint import BEST_LINK, list_checkpoints
    from autoparallel.engine.metrics import read_metrics
    from ckpt_tools.merge import merge_dist_checkpoint
    from launch.config import read_yaml
    from launch.train import launch_training

    code, output_dir = launch_training("sft", ["--config", PRESET, *argv])
    if code != 0:
        return code
    out = Path(output_dir)
    cfg = read_yaml(out / RUN_CONFIG_FILE)
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        logger.error("no checkpoint was written to %s", out)
        return 1
    step, checkpoint = checkpoints[-1]
    if (out / BEST_LINK).is_dir():  # metric_for_best_model's pick (the preset evaluates held-out exact match)
        checkpoint = (out / BEST_LINK).resolve()
    merged = out / "merged"
    if merged.exists():
        import shutil

        shutil.rmtree(merged)
    summary = merge_dist_checkpoint(str(checkpoint), str(merged), format="safetensors", progress=False)

    records = read_metrics(out / "metrics.jsonl")
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    lines = [f"trained {step} steps on {cfg.get('data_parallel_degree', 1)} processes: "
             f"loss {train[0]:.3f} -> {train[-1]:.3f}" + (f", eval loss {evals[-1]:.3f}" if evals else "")]
    generation = _in_training_evaluation(records, cfg, checkpoint.name)
    if generation:
        lines.append(generation)
    lines.append(f"merged {checkpoint.name} -> {merged} ({summary['tensors']} tensors, "
                 f"{summary['bytes'] / 2**20:.0f} MiB, {summary['seconds']:.1f} s)")
    if cfg.get("synthetic_data_dir") and cfg.get("model_name_or_path") == "tiny":
        before = _accuracy(None, "tiny", cfg["synthetic_data_dir"], int(cfg.get("seed", 42)))
        after = _accuracy(str(merged), "tiny", cfg["synthetic_data_dir"], int(cfg.get("seed", 42)))
        lines.append(f"held-out accuracy ({EVAL_QUESTIONS} questions): untrained {before:.1%} -> "
                     f"fine-tuned {after:.1%}")
        (out / "demo_result.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after,
                                                          "final_loss": train[-1]}, indent=2))
    lines.append(f"try it: qwen2vl-ap infer --model {merged} --image "
                 f"{cfg.get('synthetic_data_dir', 'IMAGE')}/images/<file>.png --prompt 'What colour is the shape?'")
    print("\n" + "\n".join(lines))
    return 0
