"""PaddleMIX's Qwen2-VL training scripts (paddlemix/examples/qwen2_vl/shell/*.sh): their launcher flags and
training arguments as the scripts write them, with the scripts' own shell variables, and a PaddleMIX-layout
dataset to run them on.

`script_argv(name, GPUS=2, ...)` evaluates a script's variable arithmetic for the given environment (the scripts
read GPUS, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, tensor_parallel_degree from it) and returns the argument list a user
passes to `qwen2vl-ap sft` after replacing `python -m paddle.distributed.launch ... qwen2vl_finetune*.py`.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from hostile_data import noise

LAUNCH = ("--master ${MASTER} --nnodes 1 --nproc_per_node ${GPUS} --rank 0 --ips ${TRAINER_INSTANCES} "
          "--run_mode=collective --log_dir ${OUTPUT_DIR}/paddle_distributed_logs")

AUTO_2B = """\
  --do_train \\
  --model_name_or_path "Qwen/Qwen2-VL-2B-Instruct" \\
  --enable_auto_parallel 1\\
  --auto_parallel_resume_form_hybrid_parallel true \\
  --use_intermediate_api true \\
  --to_static 0 \\
  --output_dir ${OUTPUT_DIR} \\
  --logging_dir ${OUTPUT_DIR}/logs \\
  --meta_path ${meta_path} \\
  --overwrite_output_dir True \\
  --dataloader_num_workers 0 \\
  --bf16 True \\
  --fp16 False \\
  --fp16_opt_level "O2" \\
  --num_train_epochs 1 \\
  --per_device_train_batch_size ${PER_DEVICE_BATCH_SIZE} \\
  --gradient_accumulation_steps ${GRADIENT_ACC} \\
  --freeze_vit True \\
  --max_seq_length 1024 \\
  --image_resolution 512 \\
  --recompute False \\
  --max_grad_norm 1.0 \\
  --evaluation_strategy "no" \\
  --save_strategy "steps" \\
  --save_steps 1000 \\
  --save_total_limit 1 \\
  --learning_rate 1e-8 \\
  --warmup_ratio 0.1 \\
  --warmup_steps 100 \\
  --weight_decay 0.1 \\
  --optim "adamw" \\
  --lr_scheduler_type "cosine" \\
  --logging_steps 1 \\
  --report_to "visualdl" \\
  --tensor_parallel_degree=${tensor_parallel_degree} \\
  --sharding_parallel_degree=${sharding_parallel_degree} \\
  --pipeline_parallel_degree=${pipeline_parallel_degree} \\
  --sep_parallel_degree=${sep_parallel_degree} \\
  --sharding="stage1" \\
  --amp_master_grad=1 \\
  --hybrid_parallel_topo_order="sharding_first" \\
"""

# Verbatim, like AUTO_2B, not derived from it: the tests run each script's argument list exactly as users copy it
# (the two scripts share most flags but differ in values and in the flags they leave out).
BASELINE = """\
  --do_train \\
  --model_name_or_path "Qwen/Qwen2-VL-${SIZE}-Instruct" \\
  --output_dir ${OUTPUT_DIR} \\
  --logging_dir ${OUTPUT_DIR}/logs \\
  --meta_path ${meta_path} \\
  --overwrite_output_dir True \\
  --dataloader_num_workers 8 \\
  --bf16 True \\
  --fp16 False \\
  --fp16_opt_level "O2" \\
  --num_train_epochs 1 \\
  --per_device_train_batch_size ${PER_DEVICE_BATCH_SIZE} \\
  --gradient_accumulation_steps ${GRADIENT_ACC} \\
  --freeze_vit True \\
  --max_seq_length 8192 \\
  --image_resolution 512 \\
  --recompute False \\
  --max_grad_norm 1.0 \\
  --evaluation_strategy "no" \\
  --save_strategy "steps" \\
  --save_steps 1000 \\
  --save_total_limit 1 \\
  --learning_rate 1e-8 \\
  --warmup_ratio 0.1 \\
  --warmup_steps 100 \\
  --weight_decay 0.1 \\
  --optim "adamw" \\
  --lr_scheduler_type "cosine" \\
  --logging_steps 1 \\
  --report_to "visualdl" \\
  --tensor_parallel_degree=${tensor_parallel_degree} \\
  --sharding_parallel_degree=${sharding_parallel_degree} \\
  --pipeline_parallel_degree=1 \\
  --sep_parallel_degree=1 \\
  --sharding="${SHARDING}" \\
  --amp_master_grad=1 \\
  --hybrid_parallel_topo_order="sharding_first" \\
"""

LORA = """\
  --lora True \\
  --lora_rank=${LORA_RANK} \\
  --lora_alpha=256 \\
  --lora_dropout=0.0 \\
  --lora_target_modules="model.layers.*q_proj.*,model.layers.*k_proj.*,model.layers.*v_proj.*,\
model.layers.*gate_proj.*,model.layers.*up_proj.*,model.layers.*down_proj.*,model.layers.*o_proj.*" \\
"""

# name -> (arguments, the script's fixed values, PER_DEVICE_BATCH_SIZE default, whether GRADIENT_ACC divides by
# the sharding degree (auto scripts) or by GPUS (baseline scripts))
SCRIPTS: dict[str, tuple[str, dict[str, str], int, str]] = {
    "auto_2b_bs32_1e8.sh": (AUTO_2B, {}, 1, "sharding"),
    "auto_2b_lora_bs32_1e8.sh": (AUTO_2B + LORA, {"LORA_RANK": "16"}, 1, "sharding"),
    "baseline_2b_bs32_1e8.sh": (BASELINE, {"SIZE": "2B", "SHARDING": "stage2"}, 2, "gpus"),
    "baseline_2b_lora_bs32_1e8.sh": (BASELINE + LORA, {"SIZE": "2B", "SHARDING": "stage1", "LORA_RANK": "12"}, 2,
                                     "gpus"),
    "baseline_7b_bs32_1e8.sh": (BASELINE, {"SIZE": "7B", "SHARDING": "stage2"}, 2, "gpus"),
    "baseline_7b_lora_bs32_1e8.sh": (BASELINE + LORA, {"SIZE": "7B", "SHARDING": "stage2", "LORA_RANK": "12"}, 2,
                                     "gpus"),
}


def script_argv(name: str, *, gpus: int, batch_size: int, meta_path: str, output_dir: str, master: str,
                tensor_parallel_degree: int = 1, pipeline_parallel_degree: int = 1) -> list[str]:
    """The launcher flags and training arguments of script `name` with its variables evaluated."""
    args, fixed, per_device, accumulation_over = SCRIPTS[name]
    sharding = gpus // tensor_parallel_degree // pipeline_parallel_degree
    values = {
        "GPUS": gpus, "PER_DEVICE_BATCH_SIZE": per_device, "tensor_parallel_degree": tensor_parallel_degree,
        "pipeline_parallel_degree": pipeline_parallel_degree, "sep_parallel_degree": tensor_parallel_degree,
        "sharding_parallel_degree": sharding, "MASTER": master, "TRAINER_INSTANCES": "127.0.0.1",
        "GRADIENT_ACC": batch_size // per_device // (sharding if accumulation_over == "sharding" else gpus),
        "OUTPUT_DIR": output_dir, "meta_path": meta_path, **fixed,
    }
    text = f"{LAUNCH} {args}".replace("\\\n", " ")
    for key, value in values.items():
        text = text.replace("${" + key + "}", str(value))
    assert "${" not in text, text
    return shlex.split(text)


def write_paddlemix_dataset(cwd: Path, records_per_entry: int = 8) -> str:
    """A meta file in PaddleMIX's layout under `cwd` (the working directory of the run): annotation and root
    relative to the working directory, records whose image paths already start with root (as in
    baseline_6data_330k.json), half of them without an `<image>` placeholder; a second entry with paths relative
    to its root (InternVL style). Returns the meta path relative to `cwd`."""
    meta: dict[str, dict] = {}
    for entry, prefixed in (("dvqa", True), ("chartqa", False)):
        root = Path("playground/data") / entry
        (cwd / root / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(records_per_entry):
            image = Path("images") / f"{i}.png"
            noise(56, 56, seed=i).save(cwd / root / image)
            question = "What colour is the picture?" if i % 2 else "<image>What colour is the picture?"
            records.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": f"colour {i}"}],
                            "images": [str(root / image) if prefixed else str(image)]})
        annotation = Path("playground/opensource") / f"{entry}.json"
        (cwd / annotation).parent.mkdir(parents=True, exist_ok=True)
        (cwd / annotation).write_text(json.dumps(records))
        meta[entry] = {"root": f"{root}/", "annotation": str(annotation), "repeat_time": 1,
                       "length": records_per_entry}
    (cwd / "configs").mkdir(exist_ok=True)
    (cwd / "configs" / "meta.json").write_text(json.dumps(meta, indent=2))
    return "configs/meta.json"
