"""Issue 10 item 1: training-step throughput, our Paddle network vs HF transformers Qwen2-VL (torch CPU, eager).

Both sides: the same "small" config (real vocab 151936, tied embeddings, hidden 512, 4 layers, GQA 8/2 heads,
2-layer ViT of width 256), the same weights (HF model saved, loaded into ours as in tests/unit/test_modeling_parity.py),
the same batch (2 samples x 512 tokens, one 224x224 image each = 64 vision tokens, every token supervised), fp32,
frozen ViT (every other parameter trained), forward + backward + AdamW step. Tokens/s = batch tokens / median step time; steps interleaved.

FLOPs per step (fwd + bwd = 3 x fwd, multiply-add = 2 FLOPs; the frozen vision tower runs forward only),
counting only what runs as matmuls:
    6 * P_llm * T  +  2 * P_vit * N  +  2 * P_merger * N / 4  +  3 * 4 * L * B * S^2 * hidden  +  4 * L_v * sum_i n_i^2 * E
P_llm = matmul weights of the decoder layers + the (tied) lm_head; T = B * S tokens (padding included: it is
computed); P_vit = patch embedding + ViT block matmuls; N = image patches; n_i = patches of image i; the
attention terms count full S x S score matrices because both eager implementations compute them.
MFU = FLOPs / step time / matmul peak (best fp32 sgemm GFLOP/s of numpy/paddle/torch measured in this process).
"""
import common  # noqa: I001  (first: pins BLAS threads before numpy/paddle/torch load)

import os
import sys
import tempfile

import numpy as np
import paddle
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers"))
from hf_oracle import Sample, build_batch, hf_model  # noqa: E402

from network.config import Qwen2VLConfig, Qwen2VLVisionConfig  # noqa: E402
from network.modeling_qwen2_vl import Qwen2VLForConditionalGeneration  # noqa: E402

BENCH = "train_step"
BENCH_TIMEOUT = 420  # read by run_all: ~3-4 min on 2 shared cores
WARMUP, REPEATS = 1, 3
LR = 1e-5  # small enough that losses stay comparable over all steps
IMAGE_GRID = (1, 16, 16)  # a 224x224 image: 256 patches, 64 LLM tokens


def small_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        mrope_section=[8, 12, 12], tie_word_embeddings=True,
        vision_config=Qwen2VLVisionConfig(depth=2, embed_dim=256, hidden_size=512, num_heads=4, mlp_ratio=4),
    )


def step_flops(config: Qwen2VLConfig, batch: dict) -> float:
    """Matmul FLOPs of one fwd+bwd step (formula in the module docstring)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * config.intermediate_size  # q, o, k, v, gate/up/down
    p_llm = config.num_hidden_layers * per_layer + config.vocab_size * h
    v = config.vision_config
    e, patch_dim = v.embed_dim, v.in_channels * v.temporal_patch_size * v.patch_size**2
    p_vit = patch_dim * e + v.depth * (4 * e * e + 2 * e * v.mlp_hidden_size)
    merged = e * v.spatial_merge_size**2
    p_merger = merged * merged + merged * h
    b, s = batch["input_ids"].shape
    grids = batch["image_grid_thw"]
    patches = int(np.prod(grids, axis=1).sum())
    attn_llm = 4 * config.num_hidden_layers * b * s * s * h
    attn_vit = 4 * v.depth * e * float(sum(int(t) * (int(hh) * int(ww)) ** 2 for t, hh, ww in grids))
    return 6 * p_llm * b * s + 2 * p_vit * patches + 2 * p_merger * patches / 4 + 3 * attn_llm + attn_vit


def main(variant: str = "") -> None:
    """`variant` labels a run under a different environment (see bench_train_step_mkl_avx2.py)."""
    config = small_config()
    samples = [Sample(19, [("image", IMAGE_GRID)], 425), Sample(40, [("image", IMAGE_GRID)], 404)]
    batch = build_batch(config, samples, seed=0)
    batch["labels"] = batch["input_ids"].copy()  # every token supervised: the head's worst case
    hf = hf_model(config, seed=0).train()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = Qwen2VLForConditionalGeneration.from_pretrained(path)
    ours.train()
    for p in hf.model.visual.parameters():  # frozen ViT on both sides
        p.requires_grad_(False)
    for p in ours.visual.parameters():
        p.stop_gradient = True
    common.pin_threads()

    hf_inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    pd_inputs = {k: paddle.to_tensor(v) for k, v in batch.items()}
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    pd_opt = paddle.optimizer.AdamW(learning_rate=LR, parameters=[p for p in ours.parameters() if not p.stop_gradient],
                                    weight_decay=0.01)
    losses: dict[str, list[float]] = {"ours": [], "theirs": []}

    def ours_step() -> None:
        loss = ours(**pd_inputs).loss
        loss.backward()
        pd_opt.step()
        pd_opt.clear_grad()
        losses["ours"].append(float(loss))

    def hf_step() -> None:
        loss = hf(**hf_inputs).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        losses["theirs"].append(float(loss))

    probe = common.MatmulPeak()
    times = common.interleave({"ours": ours_step, "theirs": hf_step, "peak": probe}, REPEATS, WARMUP)
    peak = probe.summary()
    tokens = int(batch["input_ids"].size)
    flops = step_flops(config, batch)
    t_ours, t_hf = common.median(times["ours"]), common.median(times["theirs"])
    d_loss = [abs(a - b) for a, b in zip(losses["ours"], losses["theirs"])]
    print(f"[train_step] step-0 loss ours {losses['ours'][0]:.6f} HF {losses['theirs'][0]:.6f} "
          f"|d|={d_loss[0]:.2e}; max |dloss| over {len(d_loss)} steps {max(d_loss):.2e}")
    print(f"[train_step] step s: ours {times['ours']}, HF {times['theirs']}; peak {peak}")
    mfu_ours, mfu_hf = flops / t_ours / 1e9 / peak["peak"], flops / t_hf / 1e9 / peak["peak"]
    hf_name = f"HF transformers {__import__('transformers').__version__} (torch {torch.__version__} CPU, eager)"
    extra = dict(step_s_ours=times["ours"], step_s_theirs=times["theirs"], tokens_per_step=tokens,
                 gflop_per_step=flops / 1e9, matmul_gflops=peak, loss_ours=losses["ours"],
                 loss_theirs=losses["theirs"], mkl_debug_cpu_type=os.environ.get("MKL_DEBUG_CPU_TYPE"))
    common.emit(common.Record(
        BENCH, f"train step tokens/s (small preset, fwd+bwd+AdamW, 2x512 tokens, all supervised, frozen ViT){variant}", "tokens/s",
        tokens / t_ours, tokens / t_hf, hf_name, extra=extra,
        note=f"step-0 loss ours {losses['ours'][0]:.5f} vs HF {losses['theirs'][0]:.5f} "
             f"(max |dloss| over {len(d_loss)} steps {max(d_loss):.1e}); {flops / 1e9:.0f} GFLOP/step"))
    sgemm = f"in-process fp32 sgemm GFLOP/s: paddle {peak['paddle']:.0f}, torch {peak['torch']:.0f}, " \
            f"numpy {peak['numpy']:.0f}"
    why = (f"{sgemm}. The [B*S, 151936] head dominates this shape; ours runs it fused with the loss and "
           "chunked (network/loss.py: gradients computed in the forward, never full logits), HF computes full "
           "logits and torch's fused cross-entropy.")
    common.emit(common.Record(
        BENCH, f"train step MFU vs measured sgemm peak ({peak['peak']:.0f} GFLOP/s){variant}", "%",
        100 * mfu_ours, 100 * mfu_hf, hf_name, extra=dict(peak=peak),
        note=why if t_ours > t_hf else f"{sgemm}; MFU = {flops / 1e9:.0f} GFLOP / step time / peak"))


if __name__ == "__main__":
    main()
