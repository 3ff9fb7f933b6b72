"""``calib.hf.checkpoint``: local Hugging Face checkpoints (tiny random Qwen3-MoE and Mixtral saved with
``save_pretrained``) open offline and load exactly; every bad directory fails with one line naming the file
or tensor, before any weight is read."""

import json
import shutil

import pytest
import torch

from calib.hf.checkpoint import load_model, open_checkpoint
from tests.helpers import hf_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    qwen = hf_models.build(hf_models.qwen3_moe_config(), seed=1)
    mixtral = hf_models.build(hf_models.mixtral_config(), seed=2)
    return {
        "qwen": (qwen, hf_models.save(qwen, root / "qwen")),
        "mixtral": (mixtral, hf_models.save(mixtral, root / "mixtral")),
        "sharded": (qwen, hf_models.save(qwen, root / "sharded", max_shard_size="100KB")),
    }


@pytest.mark.parametrize("name", ["qwen", "mixtral", "sharded"])
def test_checkpoint_opens_and_loads_exactly(saved, name):
    original, root = saved[name]
    ckpt = open_checkpoint(root)
    assert ckpt.architecture == type(original).__name__
    assert ckpt.config["model_type"] == original.config.model_type
    assert any(".experts.0." in k for k in ckpt.tensors)  # on disk per expert, fused in memory
    if name == "sharded":
        assert len(ckpt.files) > 1 and (root / "model.safetensors.index.json").is_file()
    if name == "mixtral":  # tied embeddings: lm_head.weight is not on disk
        assert "lm_head.weight" not in ckpt.tensors
    model = load_model(root)
    want, got = original.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    tokens = torch.randint(0, hf_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(input_ids=tokens).logits, model(input_ids=tokens).logits)


def _copy(saved, tmp_path, name="qwen"):
    return shutil.copytree(saved[name][1], tmp_path / name)


def _write(path, text):
    path.write_text(text)


EXPERT = "model.layers.1.mlp.experts"
CASES = {
    # name: (spoil(root), message with {root})
    "no config": (lambda r: (r / "config.json").unlink(), "{root}/config.json does not exist"),
    "bad json": (lambda r: _write(r / "config.json", "{not json"), "{root}/config.json is not valid JSON"),
    "unknown type": (
        lambda r: hf_models.edit_config(r, model_type="my_moe"),
        "model_type 'my_moe' is unknown to transformers",
    ),
    "not causal": (
        lambda r: hf_models.edit_config(r, model_type="vit"),
        "model_type 'vit' is not a causal language model in transformers",
    ),
    "other head": (
        lambda r: hf_models.edit_config(r, architectures=["Qwen3MoeForSequenceClassification"]),
        "architectures ['Qwen3MoeForSequenceClassification'] is not the causal LM of model_type 'qwen3_moe'",
    ),
    "no weights": (lambda r: (r / "model.safetensors").unlink(), "{root}: no weights file"),
    "pickle only": (
        lambda r: (r / "model.safetensors").rename(r / "pytorch_model.bin"),
        "only ['pytorch_model.bin']; svdq never unpickles",
    ),
    "corrupt header": (
        lambda r: hf_models.corrupt_header(r / "model.safetensors"),
        "{root}/model.safetensors: safetensors header unreadable: not JSON",
    ),
    "truncated": (
        lambda r: _write(r / "model.safetensors", "abc"),
        "{root}/model.safetensors: safetensors header unreadable: the file has 3 bytes",
    ),
    "missing expert": (
        lambda r: hf_models.rewrite_tensors(r, lambda t: t.pop(f"{EXPERT}.2.up_proj.weight")),
        f"{{root}}: tensor {EXPERT}.2.up_proj.weight is missing",
    ),
    "missing attention": (
        lambda r: hf_models.rewrite_tensors(r, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight")),
        "{root}: tensor model.layers.0.self_attn.q_proj.weight is missing",
    ),
    "unexpected": (
        lambda r: hf_models.rewrite_tensors(r, lambda t: t.update({"model.x.weight": torch.ones(3)})),
        "{root}/model.safetensors: unexpected tensor model.x.weight",
    ),
    "expert shape": (
        lambda r: hf_models.rewrite_tensors(
            r, lambda t: t.update({"model.layers.1.mlp.experts.3.down_proj.weight": torch.ones(64, 16)})
        ),
        "{root}/model.safetensors: tensor model.layers.1.mlp.experts.3.down_proj.weight has shape [64, 16], "
        "the Qwen3MoeForCausalLM that config.json builds expects [64, 32]",
    ),
    "config shape": (
        lambda r: hf_models.edit_config(r, vocab_size=320),
        "{root}/model.safetensors: tensor lm_head.weight has shape [300, 64], the Qwen3MoeForCausalLM that "
        "config.json builds expects [320, 64]",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoints_fail_with_one_line(saved, tmp_path, case):
    root = _copy(saved, tmp_path)
    spoil, message = CASES[case]
    spoil(root)
    with pytest.raises(ValueError) as err:
        open_checkpoint(root)
    text = str(err.value)
    assert message.format(root=root) in text and "\n" not in text, text


def test_sharded_index_problems_name_the_shard_and_tensor(saved, tmp_path):
    root = _copy(saved, tmp_path, "sharded")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (root / shard).unlink()
    with pytest.raises(ValueError, match=f"is in shard {shard}, which is not a file in {root}$"):
        open_checkpoint(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")
