"""The quickstart's data split (calib.corpus) and pretrained weights (calib.pretrain)."""

import math
import zlib

import pytest
import torch

from calib.corpus import eval_windows, pydoc_topics, random_windows, stdlib_sources, stdlib_split
from calib.tiny_moe import TinyMoEConfig
from tests.helpers.spawn import run_on_processes


def test_split_is_deterministic_disjoint_and_two_domain():
    a, b = stdlib_split(), stdlib_split()
    for part in ("base_train", "base_heldout", "shift_train", "shift_heldout"):
        assert torch.equal(getattr(a, part), getattr(b, part)) and getattr(a, part).numel() > 10_000
    sources = stdlib_sources()
    assert not any(name.startswith(("test/", "pydoc_data/")) for name, _ in sources)
    held = [name for name, _ in sources if zlib.crc32(name.encode()) % 10_000 < 500]
    assert held and len(held) < len(sources) / 10  # about 5 % of the files are held out
    # the held-out bytes are exactly the held-out files joined, none of them in train
    expected = b"\n".join(data for name, data in sources if name in set(held))
    assert bytes(a.base_heldout.tolist()) == expected
    prose = b"".join(text for _, text in pydoc_topics())
    assert bytes(a.shift_heldout[:200].tolist()) in prose  # the shifted domain is the pydoc prose


def test_windows_shapes_labels_and_coverage():
    ids = torch.arange(1000) % 256
    batches = eval_windows(ids, seq_len=16, batch=4, max_tokens=160)
    assert sum(b["tokens"].shape[0] for b in batches) == 10
    for b in batches:
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    # evenly spaced starts i·(N − seq − 1)//n: the last window lies near the end of the stream
    last = batches[-1]["tokens"][-1, 0].item()
    assert last == ids[9 * (1000 - 17) // 10].item()
    g = torch.Generator().manual_seed(0)
    r = random_windows(ids, 3, 16, g)
    assert r["tokens"].shape == (3, 16) and torch.equal(r["labels"][:, :-1], r["tokens"][:, 1:])
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(ids[:10], seq_len=16, batch=4, max_tokens=160)


def _pretrained_worker(rank, world, tmp):
    from calib.cli.eval import perplexity
    from calib.models import LoadedModel, ModelSource
    from calib.pretrain import load_pretrained, read_pretrained_config, save_pretrained, train
    from calib.tiny_moe import build_tiny_gpt_moe
    from lora.framework.parallel import init_parallel

    init_parallel()
    cfg = read_pretrained_config()
    model = build_tiny_gpt_moe(cfg, seed=3)
    load_pretrained(model)
    split = stdlib_split()
    lm = LoadedModel(model, cfg.vocab_size, cfg.seq_len, True, ModelSource("tiny", cfg.to_dict()))
    ppl = perplexity(lm, eval_windows(split.base_heldout, cfg.seq_len, 8, 2048), progress=False)["perplexity"]
    # a model of another shape is refused, naming the tensor, before any change
    other = build_tiny_gpt_moe(TinyMoEConfig(num_layers=4, hidden=256, heads=8, num_experts=4), seed=3)
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    try:
        load_pretrained(other)
        error = ""
    except ValueError as exc:
        error = str(exc)
    unchanged = all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    # the training script: a few steps of a tiny model, saved and loaded back
    small = TinyMoEConfig(num_layers=1, hidden=32, heads=2, num_experts=2, ffn_hidden=32, seq_len=16)
    trained, info = train(small, steps=3, batch=2, lr=1e-3, seed=0, log_every=1)
    save_pretrained(trained, small, tmp, info)
    again = build_tiny_gpt_moe(small, seed=9)
    load_pretrained(again, tmp)
    same = all(
        torch.equal(p.detach().to(torch.bfloat16), q.detach().to(torch.bfloat16))
        for p, q in zip(trained.parameters(), again.parameters())
    )
    return {
        "ppl": ppl,
        "error": error,
        "unchanged": unchanged,
        "same": same,
        "log": info["training"]["loss_log"],
    }


def test_shipped_weights_load_and_model_well_and_training_script_round_trips(tmp_path):
    (r,) = run_on_processes(_pretrained_worker, 1, str(tmp_path / "pt"), timeout=300)
    assert 1.5 < r["ppl"] < 3.5 and math.isfinite(r["ppl"])  # a trained byte-level model (random: 256)
    assert "decoder.layers.0.mlp" in r["error"] and r["unchanged"]
    assert r["same"] and len(r["log"]) == 3
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["config.json", "model.safetensors"]
