"""The training engine run by every worker: build → parallelize → train/evaluate → checkpoint.

Order follows torchtitan: plain model → (LoRA) → recompute wrappers → `dist.parallelize` (TP plan, then the
ZeRO stage over "dp") → optimizer steps. The loss of a step is the token mean over the whole global batch
(all dp ranks and accumulation micro-steps), so it does not depend on the layout.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import functools
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.amp.auto_cast import amp_global_state

from autoparallel import cpu_compat
from autoparallel.batch import ShardedBatch, shard_batch, supervised_tokens
from autoparallel.comm_ledger import Ledger, StepComm, render_comm_summary
from autoparallel.config import RUN_CONFIG_FILE, RunConfig, model_config
from autoparallel.data import SFTDataLoader, SFTDataset
from autoparallel.data.survey import data_profile
from autoparallel.engine import faults
from autoparallel.engine.checkpoint import (DIST_DIR, CheckpointWriter, load_dist_state, load_rng_state,
                                            load_trainer_state, optimizer_tensors, resolve_resume_path,
                                            restore_rng_state)
from autoparallel.engine.metrics import MetricsLogger
from autoparallel.engine.training_eval import TrainingEvaluation, has_eval_data
from autoparallel.engine.optim import apply_module_learning_rates, build_optimizer, param_dtype, use_bf16
from autoparallel.forward import forward_loss
from autoparallel.planning.memory import O2_WHITE_LIST
from autoparallel.planning.memory_report import memory_report, render_memory_report
from autoparallel.mesh import build_mesh, mesh_coordinate
from autoparallel.parallelize import parallelize
from autoparallel.pipeline import Stage, build_stage_model, make_stage, parallelize_stage
from autoparallel.planning.communication import communication, planned_sent_by_kind
from autoparallel.planning.render import render_plan_table, render_report
from autoparallel.planning.setup import PlanOptions, plan_run, step_workload
from autoparallel.sequence_parallel import apply_sequence_parallel
from autoparallel.sharded_load import allocate_for_resume, lazy_parameters, load_sharded, needs_dense_load
from autoparallel.step import scalar, train_step
from network.config import PRESETS
from network.device import allocator, peak_allocated_bytes, reset_peak_allocated
from network.hub import resolve_model_dir
from network.log import logger
from network.process_memory import peak_rss_bytes
from network.processor import Qwen2VLProcessor
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
from network.rope_index import video_tokens_per_second
from placements.qwen2_vl import Trainable


def step_shapes(batches: list[ShardedBatch]) -> dict[str, int]:
    """What a step computed on this rank, as the planner's workload counts it (its longest micro-batch): the
    padded sequence length, this rank's image/video patches and the loss positions (supervised tokens, padded
    to the most on any dp rank)."""
    return {"seq_len": max(int(b.input_ids.shape[1]) for b in batches),
            "patches": max(0 if b.pixel_values is None else int(b.pixel_values.shape[0]) for b in batches),
            "loss_positions": max(int(b.loss_index.shape[1]) for b in batches)}


class NonFiniteError(RuntimeError):
    pass


def barrier() -> None:
    # A one-process run has no global group to synchronise.
    if dist.get_world_size() > 1:
        dist.barrier()


def arm_watchdog(seconds: int) -> None:
    """Unless re-armed within `seconds`, dump every thread's stack to stderr (the worker log) and exit with code 1.
    faulthandler's timer is a C thread that needs no GIL, so it fires even inside a blocked collective; the launcher
    then stops the other ranks. Gloo's own collective timeout (fixed 30 s on CPU) only covers waits in a collective,
    not a rank stuck elsewhere (file system, data loading)."""
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def build_model(cfg: RunConfig) -> Qwen2VLForConditionalGeneration:
    """Random weights for a preset (identical on every rank: same seed, fixed init order), or for a checkpoint a
    model in the training dtype whose weights are declared only (lazy): `Trainer.load_weights` fills them after the
    plan is applied, each rank reading its own slices. ZeRO-3 cannot parallelize lazy weights: loaded first
    (tensor by tensor, see autoparallel/sharded_load.py)."""
    name = cfg.model.model_name_or_path
    if name in PRESETS:
        return Qwen2VLForConditionalGeneration(model_config(name))
    dtype = param_dtype(cfg)
    if needs_dense_load(cfg.parallel.degrees().sharding_stage):
        return Qwen2VLForConditionalGeneration.from_pretrained(resolve_model_dir(name), dtype)
    return Qwen2VLForConditionalGeneration.lazy(model_config(name), dtype)


def build_processor_for(cfg: RunConfig) -> Qwen2VLProcessor:
    """The checkpoint's tokenizer and preprocessor config (its pixel limits are the defaults the data config may
    override), or the embedded tokenizer and HF defaults for a preset."""
    name = cfg.model.model_name_or_path
    return Qwen2VLProcessor.from_pretrained(None if name in PRESETS else resolve_model_dir(name))


def apply_recompute(model: Qwen2VLForConditionalGeneration, decoder: bool = True, vit: bool = False) -> None:
    """Activation checkpointing per decoder layer and/or ViT block; the instance's forward is wrapped, so
    parameter names (and checkpoint keys) stay unchanged. A frozen ViT runs under no_grad: nothing to recompute."""
    from paddle.distributed.fleet.utils import recompute

    layers = [*(model.model.layers if decoder else []), *(model.visual.blocks if vit else [])]
    for layer in layers:
        layer.forward = functools.partial(recompute, layer.forward, use_reentrant=False)


def distribute(model: paddle.nn.Layer, optimizer: paddle.optimizer.AdamW, cfg: RunConfig, mesh: dist.ProcessMesh,
               stage: Optional[Stage], trainable: Trainable) -> tuple[paddle.nn.Layer, paddle.optimizer.Optimizer]:
    """bf16 O2 decoration (GPU only, see README), then `dist.parallelize` (of this rank's pipeline stage, if any).

    The weights are bf16 already (param_dtype; lazy ones stay lazy). master_grad: fp32 gradients (`main_grad` or
    an fp32 `.grad`, read by autoparallel.gradients), as PaddleMIX trains. `decorate` must come first:
    ShardingStage2/3 install their own master-grad hooks on the live parameters when the optimizer is sharded,
    and only if master_grad is on by then. Under stage 0/1 Paddle's end-of-backward hook casts the gradients of
    the parameters `decorate` saw, which `dist.parallelize` replaces with new (dist) objects: the hook is pointed
    at the live ones afterwards, or it would cast nothing (the stale tensors never get a gradient)."""
    degrees = cfg.parallel.degrees()
    bf16 = use_bf16(cfg)
    if bf16:
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype="bfloat16",
                                               master_weight=True, master_grad=cfg.model.amp_master_grad)
    if stage is not None:
        model, optimizer, _ = parallelize_stage(model, optimizer, stage, degrees, trainable=trainable)
    else:
        model, optimizer = parallelize(model, optimizer, mesh, degrees, trainable=trainable)
    if bf16 and cfg.model.amp_master_grad:
        master_grads_on_live_parameters(model)
    return model, optimizer


def master_grads_on_live_parameters(model: paddle.nn.Layer) -> None:
    """Point Paddle's master-grad state (`amp_global_state().model_parameters`, read by auto_cast's
    `master_grad_hook`) at `model`'s trainable parameters, and drop its per-mesh grouping of the old ones."""
    state = amp_global_state()
    state.model_parameters[:] = [p for p in model.parameters() if not p.stop_gradient]
    state.mesh2params.clear()
    state.already_classify_params_meshes = False


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.command, self.cfg = cfg.command, cfg
        if cfg.train.step_timeout > 0:  # NCCL process groups (GPU) read it at init; gloo's timeout is fixed
            os.environ.setdefault("PADDLE_PG_TIMEOUT", str(cfg.train.step_timeout * 1000))
        dist.init_parallel_env()
        cpu_compat.apply()
        self.ledger = Ledger(gloo=cpu_compat.runs_on_cpu()).install()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.output_dir = Path(cfg.train.output_dir)
        seed_everything(cfg.train.seed)
        if cfg.model.bf16 and not use_bf16(cfg):
            logger.warning("bf16: true needs a GPU with bf16 support (compute capability >= 8.0); training in fp32")
        self.degrees = cfg.parallel.degrees()
        self.resume_path = resolve_resume_path(cfg.train.resume_from_checkpoint, cfg.train.output_dir)
        self.model = build_model(cfg)
        network_config = self.model.config  # before a pipeline stage replaces the model
        self.mesh = build_mesh(self.degrees, self.model.config, allow_pipeline=True)
        self.dp_rank = mesh_coordinate(self.mesh, "dp")
        self.stage: Optional[Stage] = None
        self.batch_mesh = self.mesh  # the mesh batches live on: a stage's sub-mesh under pipeline parallel
        if self.degrees.pipeline_parallel_degree > 1:
            self.stage = make_stage(self.mesh, self.model.config, cfg.parallel.layers_per_stage or None)
            self.model = build_stage_model(self.model, self.stage)
            self.batch_mesh = self.stage.mesh
        # Sequence-sharded activations need a sequence length divisible by mp.
        self.seq_multiple = self.degrees.mp if cfg.parallel.sequence_parallel else 1

        self.dataset = SFTDataset(cfg.data, processor=build_processor_for(cfg),
                                   video_tokens_per_second=video_tokens_per_second(network_config))
        if self.rank == 0 and self.dataset.records.added_placeholders:
            logger.info("added %d <image>/<video> placeholders to records that had media but none (PaddleMIX rule)",
                        self.dataset.records.added_placeholders)
        self.loader = SFTDataLoader(self.dataset, cfg.train.per_device_train_batch_size, self.degrees.dp,
                                    self.dp_rank, seed=cfg.data.data_seed)
        self.steps_per_epoch = max(1, len(self.loader) // cfg.train.gradient_accumulation_steps)
        self.total_steps = cfg.train.total_steps(self.steps_per_epoch)

        self.trainable = cfg.model.trainable()
        self.prepare_model()
        recompute_vit = self.trainable.vit and cfg.model.recompute_vit
        if cfg.model.recompute or recompute_vit:
            apply_recompute(self.model, decoder=cfg.model.recompute, vit=recompute_vit)
        optimizer, self.schedule = build_optimizer(self.model, cfg, self.total_steps)
        self.clip_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else None
        self.model, self.optimizer = distribute(self.model, optimizer, cfg, self.mesh, self.stage, self.trainable)
        self.load_weights()
        scales = apply_module_learning_rates(self.model, cfg.train)
        if scales:
            logger.info("module learning rates (x learning_rate, same schedule): %s", scales)
        if cfg.parallel.sequence_parallel:
            apply_sequence_parallel(self.model)
        self.writer = CheckpointWriter(cfg.train.output_dir, self.rank, barrier, cfg.train.save_total_limit)
        self.evaluation = TrainingEvaluation(cfg, self.eval_dataset() if cfg.train.eval_generate else None)
        self.step = 0
        self.skipped_nonfinite = 0
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "plan.txt").write_text(self.plan_text())

    def plan_text(self) -> str:
        """plan.txt: the mesh, the plan table and the `qwen2vl-ap plan` report of this run (one planner)."""
        options = PlanOptions(device="gpu" if paddle.is_compiled_with_cuda() else "cpu", nproc_per_node=self.world)
        profile = data_profile(self.dataset)  # as `qwen2vl-ap plan --meta_path` plans it
        options = dataclasses.replace(options, **profile.plan_options(set()))
        planned = plan_run(self.cfg, options)
        collectives = communication(planned.setup, cpu=options.device == "cpu", stage=planned.memory.stage)
        return (f"mesh {self.mesh.dim_names} {self.mesh.shape}\n{render_plan_table(planned.setup)}\n\n"
                f"{profile.note()}\n{render_report(planned, collectives, options)}\n")

    def comm_summary(self, measured: list[StepComm], shapes: list[dict[str, int]]) -> str:
        """This rank's measured bytes per step against the planner's ideal for its pipeline stage, on the CPU
        (reduce-scatters as all-reduces) and the GPU plan, each step planned as it ran (`step_shapes`: its
        padded length and loss positions, not max_seq_length). The first step (lazy optimizer state, group
        set-up) is left out when there are more."""
        base = plan_run(self.cfg, PlanOptions(device="cpu", nproc_per_node=self.world)).setup
        stage = self.stage.index if self.stage is not None else None
        kept = slice(1, None) if len(measured) > 1 else slice(None)
        setups = [dataclasses.replace(base, workload=step_workload(base.workload, **s)) for s in shapes[kept]]
        by_device = {}
        for cpu in (True, False):
            by_device[cpu] = Counter()
            for setup in setups:
                by_device[cpu].update(planned_sent_by_kind(communication(setup, cpu=cpu, stage=stage), setup))
            by_device[cpu] = {kind: sent / max(len(setups), 1) for kind, sent in by_device[cpu].items()}
        return render_comm_summary(measured[kept], by_device[True], by_device[False])

    def autocast(self):
        """bf16 O2 around every forward (pipeline stages included); the embedding lookup white-listed (N9, see
        `O2_WHITE_LIST`): a bf16 residual stream, as PaddleMIX trains and the planner counts."""
        return paddle.amp.auto_cast(enable=use_bf16(self.cfg), level="O2", dtype="bfloat16",
                                    custom_white_list=set(O2_WHITE_LIST))

    def prepare_model(self) -> None:
        """Hook for variants (LoRA) to change the plain model before it is parallelized."""

    def load_weights(self) -> None:
        """Materialise the lazy weights of the parallelized model: this rank's slices of the checkpoint, or zeros
        when a resume is about to overwrite them (the base checkpoint is not read then)."""
        if not lazy_parameters(self.model):
            return
        if self.resume_path is not None and self.checkpoint_holds_frozen_weights():
            allocate_for_resume(self.model)
        else:
            load_sharded(self.model, resolve_model_dir(self.cfg.model.model_name_or_path), part=self.stage is not None)

    # ---- state --------------------------------------------------------------------------------------------
    def checkpoint_holds_frozen_weights(self) -> bool:
        """True: checkpoints store every weight (merge-ckpt makes a whole model of one). Variants (LoRA) may store
        only what they train, reading the rest from `model_name_or_path` again on resume."""
        return True

    def state_dict(self) -> dict[str, paddle.Tensor]:
        """What a checkpoint stores and a resume loads: the model (or its trained parameters only, see
        `checkpoint_holds_frozen_weights`) and the optimizer."""
        model = dict(self.model.state_dict())
        if not self.checkpoint_holds_frozen_weights():
            model = {name: tensor for name, tensor in model.items() if not tensor.stop_gradient}
        return model | optimizer_tensors(self.optimizer)

    def ensure_optimizer_states(self) -> None:
        """AdamW creates its moments lazily at the first step; loading a checkpoint needs them to exist.
        A step with zero gradients and learning rate 0 creates them without changing any weight."""
        params = [p for p in self.model.parameters() if not p.stop_gradient]
        paddle.add_n([(p * 0).sum() for p in params]).backward()
        saved = self.schedule.last_lr
        self.schedule.last_lr = 0.0
        self.optimizer.step()
        self.optimizer.clear_grad()
        self.schedule.last_lr = saved

    def resume(self) -> None:
        path = self.resume_path
        if path is None:
            if self.cfg.train.resume_from_checkpoint:
                logger.info("resume_from_checkpoint=auto: no checkpoint in %s, starting fresh", self.output_dir)
            return
        self.ensure_optimizer_states()
        state = self.state_dict()
        rebuilt = load_dist_state(state, path / DIST_DIR, self.optimizer, self.model.parameters())
        if rebuilt:
            logger.warning("%s has no fp32 master weights (an older checkpoint): %d rebuilt from its bf16 weights",
                           path, rebuilt)
        trainer_state = load_trainer_state(path)
        self.step = trainer_state["global_step"]
        self.skipped_nonfinite = trainer_state.get("skipped_nonfinite", 0)
        self.schedule.set_state_dict(trainer_state["lr_scheduler"])
        self.loader.load_state_dict(trainer_state["data_loader"])
        self.evaluation.load_state_dict(trainer_state.get("early_stopping"))
        rng = load_rng_state(path, self.rank)
        if rng is not None and trainer_state.get("world_size") == self.world:
            restore_rng_state(rng)
        logger.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        trainer_state = {
            "global_step": self.step, "total_steps": self.total_steps, "world_size": self.world,
            "skipped_nonfinite": self.skipped_nonfinite,
            "degrees": self.cfg.parallel.__dict__, "lr_scheduler": self.schedule.state_dict(),
            "data_loader": self.loader.state_dict(), "command": self.command,
            "early_stopping": self.evaluation.state_dict(),
        }
        self.writer.best_step = self.evaluation.state.best_step

        def write_extra(directory: Path) -> None:
            self.model.config.save_pretrained(str(directory))
            self.dataset.processor.save_pretrained(str(directory), self.model.config.model_type)
            self.cfg.save_yaml(directory / RUN_CONFIG_FILE)
            self.write_adapter(directory)

        return self.writer.save(self.step, self.save_tensors, trainer_state,
                                write_extra)

    def save_tensors(self, path: str) -> None:
        # safetensors rank files: streamable by ckpt_tools and safe to open (measured 2x faster than pickle).
        dist.save_state_dict(self.state_dict(), path, safetensors=True)

    def write_adapter(self, directory: Path) -> None:
        """Hook for variants (LoRA) to export extra files into a checkpoint."""

    # ---- training -----------------------------------------------------------------------------------------
    def shard(self, raw: dict[str, Any]) -> ShardedBatch:
        return shard_batch(raw, self.batch_mesh, self.model.config, seq_multiple=self.seq_multiple)

    def micro_batches(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.loader

    def poison_loss(self, loss: paddle.Tensor) -> paddle.Tensor:
        # Every rank applies the same op (factor 1.0 where not poisoned): the loss is a dist tensor and an op on
        # one rank only can reshard (a collective) that the other ranks never join, which hangs the job.
        return loss * (float("nan") if faults.poison_loss(self.rank, self.step + 1) else 1.0)

    def train_step(self, batches: list[ShardedBatch]) -> dict[str, Any]:
        """One optimizer step (`autoparallel.step.train_step`). Loss and grad norm are global values, so every rank
        takes the same decision on a non-finite step (raise, or skip it with `skip_nonfinite_steps`)."""
        lr = self.schedule.last_lr
        result = train_step(self.model, self.optimizer, batches, clip_norm=self.clip_norm, stage=self.stage,
                            autocast=self.autocast, transform_loss=self.poison_loss)
        if not result.applied:
            problem = f"step {self.step + 1}: loss={result.loss} grad_norm={result.grad_norm} is not finite"
            if not self.cfg.train.skip_nonfinite_steps:
                raise NonFiniteError(f"{problem} (skip_nonfinite_steps: true skips such steps instead)")
            # As Megatron/HF do for overflowed steps: the data is consumed and the step counts toward max_steps,
            # but the optimizer (weights, moments, AdamW step count) and the LR schedule stay where they were.
            self.skipped_nonfinite += 1
            logger.warning("%s; skipped (no weight update, LR schedule not advanced; %d skipped so far)",
                           problem, self.skipped_nonfinite)
            return {"skipped": True, "lr": lr}
        self.schedule.step()
        return {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm}

    def eval_dataset(self) -> SFTDataset:
        """eval_meta_path's samples, else the records val_size held out of the training data."""
        if not self.cfg.train.eval_meta_path:
            return self.dataset.held_out()
        return SFTDataset(self.cfg.data, processor=self.dataset.processor, meta_path=self.cfg.train.eval_meta_path,
                          video_tokens_per_second=self.dataset.video_tokens_per_second)

    def evaluate(self) -> Optional[float]:
        if not has_eval_data(self.cfg):
            return None
        dataset = self.eval_dataset()
        loader = SFTDataLoader(dataset, self.cfg.train.per_device_eval_batch_size, self.degrees.dp, self.dp_rank,
                               shuffle=False, seed=self.cfg.data.data_seed)
        total, tokens = 0.0, 0
        self.model.eval()
        with paddle.no_grad():
            for raw in loader:
                batch = self.shard(raw)
                with self.autocast():
                    total += scalar(forward_loss(self.model, batch, 1.0))
                tokens += supervised_tokens([batch])
        self.model.train()
        loader.close()
        return total / max(tokens, 1)

    def train(self) -> None:
        cfg, train = self.cfg, self.cfg.train
        arm_watchdog(train.step_timeout)
        self.resume()
        metrics = MetricsLogger(train.output_dir, self.total_steps, self.step, enabled=self.rank == 0)
        batches = self.micro_batches()
        self.model.train()
        measured: list[StepComm] = []
        shapes: list[dict[str, int]] = []
        reset_peak_allocated()  # the steps' peak: what the planner's step total models
        while self.step < self.total_steps:
            arm_watchdog(train.step_timeout)  # covers this step with its evaluation and checkpoint save
            started = time.time()
            raw = [next(batches) for _ in range(train.gradient_accumulation_steps)]
            self.ledger.start_step()
            sharded = [self.shard(b) for b in raw]
            record = self.train_step(sharded)
            measured.append(self.ledger.end_step())
            record |= {"comm_bytes": measured[-1].sent, "comm": measured[-1].record()}
            self.step += 1
            faults.maybe_fail(self.rank, self.step, "train")
            elapsed = time.time() - started
            tokens = sum(int(scalar(b.attention_mask.sum())) for b in sharded)
            shapes.append(step_shapes(sharded))
            record |= {"step": self.step, "tokens": tokens, "skipped_nonfinite": self.skipped_nonfinite,
                       **shapes[-1],
                       "samples": train.per_device_train_batch_size * self.degrees.dp * len(raw),
                       "step_time_s": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                       "epoch": self.loader.state_dict()["epoch"]}
            if cfg.data.packing:  # real tokens / computed positions of this step's global batches
                record["packing_fill"] = sum(b["fill"] for b in raw) / len(raw)
            if self.step == 1:
                self.report_memory()
            if self.step % train.logging_steps == 0 or self.step == self.total_steps:
                metrics.log(record)
            if train.evaluation_strategy == "steps" and train.eval_steps and self.step % train.eval_steps == 0:
                eval_loss = self.evaluate()
                evaluated = {} if eval_loss is None else {"eval_loss": eval_loss}
                evaluated |= self.evaluation.generation_metrics(self.model)
                if evaluated:
                    metrics.log({"step": self.step, **evaluated})
                    self.evaluation.observe(self.step, evaluated)
            if train.save_steps and self.step % train.save_steps == 0:
                self.save()
            if self.evaluation.should_stop():
                break
        arm_watchdog(train.step_timeout)
        if self.rank == 0:
            logger.info("%s", self.comm_summary(measured, shapes))
        peaks = self.report_peak_memory()  # before the final save: what the planner's start-up/step peaks model
        if not (train.save_steps and self.step % train.save_steps == 0):
            self.save()
        by_kind = self.skipped_samples()
        if self.rank == 0 and by_kind:
            logger.warning("skipped %d bad samples: %s", sum(by_kind.values()), json.dumps(by_kind))
        metrics.log({"step": self.step, "skipped_samples": sum(by_kind.values()), "skipped_by_kind": by_kind,
                     "skipped_nonfinite": self.skipped_nonfinite,
                     "placeholders_added": self.dataset.records.added_placeholders, **peaks})
        metrics.close()
        self.loader.close()
        barrier()
        faulthandler.cancel_dump_traceback_later()

    def skipped_samples(self) -> dict[str, int]:
        """Bad records skipped by this run on any rank, by kind. Probe failures are seen by every rank, decode
        failures only by the rank decoding the sample, so the ranks' records are gathered and counted once."""
        local = self.dataset.skips.entries()
        gathered: list[list[tuple]] = []
        if self.world > 1:
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        unique = {tuple(entry) for entries in gathered for entry in entries}
        return dict(Counter(kind for _, _, kind in unique))

    def report_peak_memory(self) -> dict[str, float | int]:
        """This rank's peak resident memory so far (start-up and steps) and the allocator's peak allocated bytes
        during the steps (the CUDA device's on a GPU, Paddle's host allocator on CPU: `network.device`), appended
        to memory_rank{r}.txt; the second is what the planner's per-rank step total models. Returns both for
        metrics.jsonl."""
        peak_gib = peak_rss_bytes() / 2**30
        allocated = peak_allocated_bytes()
        with open(self.output_dir / f"memory_rank{self.rank}.txt", "a") as f:
            f.write(f"peak RSS of this rank's process (VmHWM) after {self.step} steps: {peak_gib:.3f} GiB\n")
            f.write(f"peak {allocator()} memory allocated after {self.step} steps: {allocated / 2**30:.3f} GiB "
                    f"({allocated} bytes, during the steps)\n")
        logger.info("peak RSS of rank %d: %.2f GiB; peak %s memory allocated during the steps: %.3f GiB", self.rank,
                    peak_gib, allocator(), allocated / 2**30)
        return {"peak_rss_gib": round(peak_gib, 3), "peak_allocated_bytes": allocated}

    def report_memory(self) -> None:
        report = memory_report(self.model, self.optimizer, self.degrees, trainable=self.trainable)
        text = render_memory_report(report)
        (self.output_dir / f"memory_rank{self.rank}.txt").write_text(text + "\n")
        if self.rank == 0:
            logger.info("memory per rank after step 1:\n%s", text)
