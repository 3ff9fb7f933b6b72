"""The command line on local Hugging Face checkpoints (``--model hf:DIR``, tiny random Qwen3-MoE and Mixtral):
calibrate → eval → finetune → export keep the transformers module names and ``config.json``; the token
losses match a float64 reference; bad directories exit 2 with one line naming the file or tensor, before
any work; ``--backend megatron`` builds the Megatron twin."""

import json
import shutil

import pytest
import torch

from calib.models import build_model, resolve_source
from lora.io.container import read_metadata
from tests.helpers import hf_models
from tests.helpers.cli import no_temporaries, run_cli_cases

SMALL = ["--tokens", "1024", "--seq-len", "32"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfcli")
    qwen = hf_models.save(hf_models.build(hf_models.qwen3_moe_config(), seed=1), root / "qwen")
    mixtral = hf_models.save(hf_models.build(hf_models.mixtral_config(), seed=2), root / "mixtral")
    return qwen, mixtral


def _config(root):
    return json.loads((root / "config.json").read_text())


def _attention_linears(n_layers=2):
    return {f"model.layers.{i}.self_attn.{p}_proj" for i in range(n_layers) for p in "qkvo"}


def test_hf_source_dims_and_token_losses_match_float64(saved):
    qwen, _ = saved
    source = resolve_source(f"hf:{qwen}")
    assert source.kind == "hf" and source.backend == "torch"
    assert source.data_dims == (hf_models.VOCAB, 128)  # min(256, max_position_embeddings=128)
    assert resolve_source(f"hf:{qwen}", seq_len=16).data_dims == (hf_models.VOCAB, 16)
    with pytest.raises(ValueError, match=r"--seq-len 129 must lie in \[1, max_position_embeddings=128\]"):
        resolve_source(f"hf:{qwen}", seq_len=129)
    lm = build_model(source)
    tokens = torch.randint(0, hf_models.VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
    with torch.no_grad():
        got = lm.token_losses(batch)  # (2, 16)
        logits = lm.model(input_ids=batch["tokens"]).logits.double()  # (2, 16, vocab)
    ref = -torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (2, 16)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 logits vs float64 softmax


@pytest.mark.slow
def test_hf_workflow_keeps_module_names_and_config(saved, tmp_path):
    qwen, mixtral = saved
    c, ft, exp, peft = (tmp_path / n for n in ("c", "ft", "exp", "peft"))
    cm, fc = tmp_path / "cm", tmp_path / "fc"
    adapters = ft / "adapters.safetensors"
    factory = "tests.helpers.hf_models:make_tiny_qwen3_moe"
    cases = [
        ["calibrate", "--out", c, "--model", f"hf:{qwen}", *SMALL, "--rank", "4", "--batch", "4"],
        [
            "finetune",
            "--checkpoint",
            c / "model",
            "--out",
            ft,
            "--steps",
            "4",
            "--batch",
            "2",
            "--tokens",
            "1024",
        ],
        ["export", "--checkpoint", c / "model", "--adapters", adapters, "--out", exp],
        ["export", "--checkpoint", c / "model", "--adapters", adapters, "--out", peft, "--format", "peft"],
        ["eval", "--checkpoint", exp, "--tokens", "1024"],
        ["eval", "--checkpoint", c / "model", "--adapters", adapters, "--tokens", "1024"],
        ["eval", "--checkpoint", c / "model", "--tokens", "1024"],
        ["calibrate", "--out", cm, "--model", f"hf:{mixtral}", *SMALL, "--rank", "4", "--batch", "4"],
        ["eval", "--checkpoint", cm / "model", "--tokens", "1024"],
        ["calibrate", "--out", fc, "--model", factory, "--tokens", "1024", "--rank", "4", "--batch", "2"],
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases, results):
        assert code == 0, (argv, err[-3000:])
    ppl = [float(r[1].split("perplexity ")[1].split()[0]) for r in results[4:7]]
    assert ppl[0] == ppl[1] and ppl[1] != ppl[2]  # the export is the checkpoint + its adapters
    for out, src in ((c / "model", qwen), (exp, qwen), (peft, qwen), (cm / "model", mixtral)):
        assert _config(out) == _config(src), out  # config.json survives unchanged
    for out in (c / "model", exp, cm / "model"):
        meta = read_metadata(out)
        assert set(meta["layers"]) == _attention_linears(), out  # transformers' module names, unwrapped
        assert (
            meta["user"]["model"]["spec"].startswith("hf:")
            and meta["user"]["model"]["config"]["seq_len"] == 32
        )
    peft_cfg = json.loads((peft / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == str((peft / "base").resolve())  # the residual base
    assert set(peft_cfg["target_modules"]) == _attention_linears()
    assert _config(fc / "model")["model_type"] == "qwen3_moe"  # a factory's transformers model: its config
    assert set(read_metadata(fc / "model")["layers"]) == _attention_linears()
    assert not no_temporaries(tmp_path)


def _spoiled(saved, tmp_path):
    qwen, _ = saved
    dirs = {}
    for name in ("noweights", "arch", "missing", "shape", "header"):
        dirs[name] = shutil.copytree(qwen, tmp_path / name)
    (dirs["noweights"] / "model.safetensors").unlink()
    hf_models.edit_config(dirs["arch"], model_type="vit", architectures=["ViTModel"])
    hf_models.rewrite_tensors(
        dirs["missing"], lambda t: t.pop("model.layers.0.mlp.experts.1.gate_proj.weight")
    )
    hf_models.rewrite_tensors(
        dirs["shape"], lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)})
    )
    hf_models.corrupt_header(dirs["header"] / "model.safetensors")
    return dirs


def test_bad_hf_directories_exit_2_with_one_line_before_any_work(saved, tmp_path):
    d = _spoiled(saved, tmp_path)
    out = tmp_path / "out"
    cal = ["calibrate", "--out", out, "--tokens", "512", "--model"]
    cases = [
        cal + [f"hf:{d['noweights']}"],
        cal + [f"hf:{d['arch']}"],
        cal + [f"hf:{d['missing']}"],
        ["eval", "--tokens", "512", "--seq-len", "16", "--model", f"hf:{d['shape']}"],
        cal + [f"hf:{d['header']}"],
        cal + [f"hf:{tmp_path / 'nowhere'}"],
        cal + [f"hf:{saved[0]}", "--seq-len", "1000"],
        cal + ["tiny", "--seq-len", "16"],
        cal + [f"hf:{saved[0]}", "--model-config", d["arch"] / "config.json"],
    ]
    messages = [
        f"{d['noweights']}: no weights file (model.safetensors or model.safetensors.index.json)",
        f"{d['arch']}/config.json: model_type 'vit' is not a causal language model in transformers",
        f"{d['missing']}: tensor model.layers.0.mlp.experts.1.gate_proj.weight is missing",
        f"{d['shape']}/model.safetensors: tensor model.layers.1.self_attn.k_proj.weight has shape [16, 64], "
        "the Qwen3MoeForCausalLM that config.json builds expects [32, 64]",
        f"{d['header']}/model.safetensors: safetensors header unreadable: not JSON",
        f"Hugging Face checkpoint directory {tmp_path / 'nowhere'} does not exist",
        "--seq-len 1000 must lie in [1, max_position_embeddings=128]",
        "--seq-len applies to hf:DIR models",
        "--model-config applies to 'tiny' and 'megatron:DIR'",
    ]
    results = run_cli_cases(cases)
    for argv, (code, stdout, err), message in zip(cases, results, messages):
        assert code == 2, (argv, stdout, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"svdq {argv[0]}: error: ") and message in last, (argv, err[-2000:])
        assert err.count(": error: ") == 1 and "Traceback" not in err, err
    assert not out.exists() and not no_temporaries(tmp_path)


@pytest.mark.slow
def test_backend_megatron_builds_the_twin(saved, tmp_path):
    pytest.importorskip("calib.hf.to_megatron")
    qwen, _ = saved
    c = tmp_path / "c"
    cases = [
        ["calibrate", "--out", c, "--model", f"hf:{qwen}", "--backend", "megatron", *SMALL, "--rank", "4"],
        ["eval", "--checkpoint", c / "model", "--tokens", "1024"],
        ["eval", "--checkpoint", c / "model", "--tokens", "1024", "--backend", "torch"],
    ]
    results = run_cli_cases(cases)
    assert [r[0] for r in results[:2]] == [0, 0], [r[2][-3000:] for r in results]
    assert results[2][0] == 2 and "the checkpoint holds the megatron model" in results[2][2]
    assert _config(c / "model") == _config(qwen)
    meta = read_metadata(c / "model")
    assert meta["model_kind"] == "megatron" and meta["user"]["model"]["config"]["backend"] == "megatron"
