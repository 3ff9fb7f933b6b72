"""The adapters of a calibrated model train under other training loops (README "Other training loops").

* Megatron: a calibrated tiny GPT-MoE wrapped in Megatron's ``DistributedDataParallel`` and trained with
  ``megatron.core.optimizer.get_megatron_optimizer`` (Adam, ``OptimizerConfig``) in a ``pretrain_gpt``-style
  loop (``zero_grad_buffer`` → forward with labels → backward → ``finish_grad_sync`` → ``optimizer.step``).
  On CPU ``clip_grad=0.0`` (megatron-core asserts CUDA gradients when clipping; lora.framework.cpu_patches
  puts the optimizer's own buffers on the CPU). The loss on the training batch decreases and only adapter
  parameters change (every base tensor, quantized residual and scale bit-identical).
* Hugging Face: a tiny Qwen3-MoE quantized by ``svdq.quantize`` (SVDQLinear / SVDQExperts), its
  ``lora_down`` / ``lora_up`` trained by ``transformers.Trainer`` (CPU, no downloads, ``report_to=[]``);
  the logged loss decreases and the frozen state (quantized weights, scales, smoothing) is unchanged.
"""

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch

CFG = TinyMoEConfig(num_layers=1, hidden=32, heads=4, num_experts=4, ffn_hidden=32, seq_len=16)


def _state(model):
    """Every parameter and buffer by name (the base's quantized residuals, scales, smoothing included)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {k: v.detach().clone() for k, v in tensors}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.slow
def test_megatron_optimizer_and_ddp_train_the_adapters_of_a_calibrated_model(megatron_world):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from calib.calibrate import CalibConfig, calibrate
    from calib.train import adapter_parameters
    from svdq import SVDQConfig

    model = build_tiny_gpt_moe(CFG, seed=1)
    batches = [tiny_moe_batch(CFG, batch=4, seed=s) for s in range(3)]

    def loop(m):
        for b in batches:
            m(b["tokens"], b["position_ids"], None)

    calibrate(model, loop, CalibConfig(svdq=SVDQConfig(rank=4), progress=False))
    adapters = set(adapter_parameters(model))
    assert adapters and {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    before = _state(model)

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=False, fp16=False, clip_grad=0.0), [ddp]
    )
    b = batches[0]
    losses = []
    ddp.train()
    for _ in range(5):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses

    changed = _changed(before, _state(model))
    assert changed == adapters, sorted(changed ^ adapters)[:5]  # every adapter moved, nothing else


def test_hf_trainer_trains_the_svdq_branches(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from svdq import SVDQConfig, quantize
    from tests.helpers.hf_moe import forward_loop_of, tiny_moe, token_batches

    model = tiny_moe("qwen3_moe", seed=0)
    calib = token_batches(n=2, batch=2, seq=16, seed=1)
    quantize(model, SVDQConfig(rank=4), forward_loop_of(calib), progress=False)
    # the low-rank branches of every SVDQLinear and SVDQExperts (lora.model.branch_parameters covers the
    # SVDQLinear ones only)
    branches = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_down", "lora_up")}
    expert_branches = {n for n in branches if ".experts." in n}
    assert expert_branches and len(branches) > len(expert_branches)  # SVDQExperts and SVDQLinear
    for p in model.parameters():
        p.requires_grad_(False)
    for p in branches.values():
        p.requires_grad_(True)
    before = _state(model)

    ids = token_batches(n=1, batch=4, seq=16, seed=2)[0]  # (4, 16)

    class Tokens(Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1e-3, losses

    changed = _changed(before, _state(model))
    assert changed and changed <= set(branches), sorted(changed - set(branches))[:5]
    assert expert_branches & changed  # the experts' branches trained too
