"""calib.pretrain_hf: a few steps lower the loss, and the output is a standard HF checkpoint."""

import json

import torch
from transformers import AutoModelForCausalLM

from calib.pretrain_hf import heldout_loss, main


def test_pretrain_writes_a_loadable_hf_checkpoint(tmp_path):
    out = tmp_path / "q3"
    assert (
        main(["--out", str(out), "--steps", "12", "--batch", "4", "--seq-len", "32", "--device", "cpu"]) == 0
    )
    info = json.loads((out / "training.json").read_text())
    log = info["loss_log"]
    assert log[0][0] == 0 and log[-1][0] == 11 and log[-1][1] < log[0][1]  # the loss fell
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 8
    from calib.corpus import eval_windows, stdlib_split

    held = eval_windows(stdlib_split().base_heldout, 32, 4, 64 * 32 * 4, "cpu")
    # the reloaded bf16 weights give the recorded held-out loss (to bf16 rounding of the weights)
    assert abs(heldout_loss(model, held) - info["base_heldout_loss"]) < 0.05
