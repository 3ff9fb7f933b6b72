"""svdq.quantize on a plain torch model: SVDQuant W4A4 NVFP4, then train only the low-rank branches.

python examples/quantize_torch_model.py [--steps 50]
"""

import argparse

import torch
from torch import nn

import svdq
from svdq.formats import fake_quant


def main(steps: int = 50) -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    x[:, :4] *= 20  # a few outlier channels, as real activations have
    teacher = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    y = teacher(x).detach()
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    model.load_state_dict(teacher.state_dict())

    fmt = svdq.SVDQConfig().weight_quant
    rtn = nn.functional.linear(fake_quant(x, fmt), fake_quant(teacher[0].weight, fmt), teacher[0].bias)
    svdq.quantize(model, svdq.SVDQConfig.preset("nvfp4-w4a4-r32").replace(rank=16), lambda m: m(x[:1024]))
    for name, layer in model.named_children():
        if isinstance(layer, svdq.SVDQLinear):
            s = layer.svdq_summary
            errors = f"output error RTN {s['rtn_error']:.3f} → {s['final_error']:.3f}"
            print(f"layer {name}: alpha {s['alpha']}, {errors}")
    ref0 = teacher[0](x)
    print(f"first layer on all tokens: RTN {((rtn - ref0).norm() / ref0.norm()):.3f}")

    params = [p for p in model.parameters() if p.requires_grad]  # lora_down / lora_up only
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(steps):
        loss = (model(x) - y).square().mean() / y.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}: relative squared error {loss.item():.5f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    main(parser.parse_args().steps)
