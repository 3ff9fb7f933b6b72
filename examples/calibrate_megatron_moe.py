"""Calibrate a Megatron GPT-MoE with calib.calibrate, fine-tune the adapters, save them and the report.

    python examples/calibrate_megatron_moe.py --out runs/example [--steps 20]

Writes <out>/report.json, <out>/report.png (with matplotlib) and <out>/adapters.safetensors.
"""

import argparse
from pathlib import Path

import torch


def main(out: Path, steps: int) -> None:
    from calib.calibrate import CalibConfig, calibrate
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
    from lora.framework.parallel import destroy_parallel, init_parallel
    from lora.model import save_adapters
    from svdq import SVDQConfig

    out.mkdir(parents=True, exist_ok=True)
    init_parallel()
    try:
        cfg = TinyMoEConfig()
        model = build_tiny_gpt_moe(cfg, seed=0)
        batches = [tiny_moe_batch(cfg, batch=8, seed=s) for s in range(4)]
        report = calibrate(
            model,
            lambda m: [m(b["tokens"], b["position_ids"], None) for b in batches],
            CalibConfig(svdq=SVDQConfig(rank=8), layout="auto"),
        )
        report.print()
        report.write_json(out / "report.json")
        report.plot_png(out / "report.png")

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        b = batches[0]
        for step in range(steps):
            loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 5 == 0 or step == steps - 1:
                print(f"step {step:3d}: loss {loss.item():.4f}")
        save_adapters(model, out / "adapters.safetensors")
        print(f"wrote {out}/report.json and {out}/adapters.safetensors")
    finally:
        destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing / spawn-safe entry point
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(args.out, args.steps)
