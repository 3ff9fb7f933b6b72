"""calib.hf.to_megatron: the Megatron GPT-MoE built from a Hugging Face MoE model gives the HF logits.

Tiny random transformers models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; hidden 64, 4 experts, top-2,
2 layers, vocabulary 96) with every weight redrawn (norm weights 1 + noise, so that swapped norms show;
RMSNorm eps 1e-2, so that a lost eps shows), in float32. The reference is the HF model's own forward.
Tolerance: 1e-4 relative, both ‖Δ‖/‖ref‖ and max|Δ| / max|ref| (float32 round-off of two
implementations of the same sums: at most 4.8e-7 seen).

Covered: in-memory models and checkpoint directories (``save_pretrained``; Qwen3-MoE through
nvidia-modelopt's importer and through ours, identical weights), tied embeddings, vocabulary padding, a
real 2-process gloo run with expert parallelism 2 (each rank its experts) and tensor parallelism 2, the
errors (unsupported ``model_type`` / config feature, OLMoE under tensor parallelism, unusable importer or
spec). The Transformer Engine specs run on GPU hosts only (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch

from calib.hf.to_megatron import megatron_from_hf, padded_vocab_size
from tests.helpers.spawn import run_on_processes

TOL = 1e-4
VOCAB, SEQ, BATCH = 96, 16, 2
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-2,  # large enough that a lost eps shows in the logits
)
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_config(model_type: str, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    if model_type == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, **overrides)
    if model_type == "qwen3_moe":  # head_dim 24 ≠ hidden / heads; renormalized top-k as Qwen3-30B-A3B
        fields = dict(intermediate_size=128, moe_intermediate_size=32, head_dim=24, num_experts=4)
        return Qwen3MoeConfig(**COMMON, **{**fields, "norm_topk_prob": True, **overrides})
    if model_type == "qwen2_moe":  # q/k/v biases, a gated shared expert
        from transformers import Qwen2MoeConfig

        fields = dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        return Qwen2MoeConfig(**COMMON, **{**fields, "num_experts": 4, **overrides})
    if model_type == "olmoe":  # norm_topk_prob False (its default): softmax over all experts
        fields = dict(intermediate_size=32, num_experts=4, pad_token_id=None, eos_token_id=None)
        return OlmoeConfig(**COMMON, **{**fields, **overrides})
    if model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"})
    raise ValueError(model_type)


def tiny_hf(model_type: str, seed: int = 0, **overrides):
    """A random HF model (every weight drawn from ``seed``), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, **overrides)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def batch(vocab: int = VOCAB):
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return tokens, torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1).contiguous()


def hf_logits(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens.to(hf.device)).logits.float().cpu()  # (b, s, V)


def mcore_logits(model, tokens, pos) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(tokens.to(dev), pos.to(dev), None).float().cpu()  # (b, s, V_pad / tp)


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖Δ‖/‖ref‖, max|Δ| / max|ref|) in float64."""
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm()).item(), (d.abs().max() / ref.double().abs().max()).item()


def assert_close(out, ref, what=""):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    rel, rel_max = errors(out, ref)
    assert rel < TOL and rel_max < TOL, (what, rel, rel_max)


@pytest.mark.parametrize("model_type", ARCHS)
def test_logits_match_hf(megatron_world, model_type):
    hf = tiny_hf(model_type)
    tokens, pos = batch()
    model = megatron_from_hf(hf, spec="local")
    assert_close(mcore_logits(model, tokens, pos), hf_logits(hf, tokens), model_type)


@pytest.mark.parametrize("model_type", ARCHS)
def test_checkpoint_dir_matches_hf(megatron_world, model_type, tmp_path):
    hf = tiny_hf(model_type, seed=3)
    hf.save_pretrained(tmp_path)
    tokens, pos = batch()
    model = megatron_from_hf(tmp_path, spec="local")  # Qwen3-MoE: nvidia-modelopt's importer
    assert_close(mcore_logits(model, tokens, pos), hf_logits(hf, tokens), model_type)


def test_qwen3_moe_importers_agree(megatron_world, tmp_path):
    hf = tiny_hf("qwen3_moe", seed=5)
    hf.save_pretrained(tmp_path)
    ours = megatron_from_hf(tmp_path, spec="local", importer="svdq").state_dict()
    theirs = megatron_from_hf(tmp_path, spec="local", importer="modelopt").state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, theirs[k]), k


def test_tied_embeddings(megatron_world):
    hf = tiny_hf("qwen3_moe", seed=2, tie_word_embeddings=True)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens, pos = batch()
    model = megatron_from_hf(hf, spec="local")
    assert model.share_embeddings_and_output_weights
    assert_close(mcore_logits(model, tokens, pos), hf_logits(hf, tokens))


def test_vocab_padding(megatron_world):
    hf = tiny_hf("mixtral", seed=4)
    tokens, pos = batch()
    model = megatron_from_hf(hf, spec="local", make_vocab_size_divisible_by=64)
    out = mcore_logits(model, tokens, pos)
    assert out.shape[-1] == padded_vocab_size(VOCAB, 1, 64) == 128
    assert torch.equal(out[..., VOCAB:], torch.zeros_like(out[..., VOCAB:]))  # zero rows: logit 0
    assert_close(out[..., :VOCAB], hf_logits(hf, tokens))


def test_unsupported_model_type(megatron_world):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(hf_config("llama"))
    with pytest.raises(ValueError, match=r"'llama' is not supported.*mixtral, olmoe, qwen2_moe, qwen3_moe"):
        megatron_from_hf(llama)


def test_unsupported_config_and_options(megatron_world, tmp_path):
    with pytest.raises(ValueError, match="qwen3_moe: config mlp_only_layers=\\[1\\]"):
        megatron_from_hf(tiny_hf("qwen3_moe", mlp_only_layers=[1]))
    hf = tiny_hf("olmoe")
    with pytest.raises(ValueError, match="importer='modelopt' does not apply: .*no import mapping for olmoe"):
        megatron_from_hf(hf, importer="modelopt")
    with pytest.raises(ValueError, match="checkpoint directory, not an in-memory model"):
        megatron_from_hf(tiny_hf("qwen3_moe"), importer="modelopt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        megatron_from_hf(tmp_path)
    if not _have_te():
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            megatron_from_hf(hf, spec="te")


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


# ------------------------------------------------------------------------------------ model parallel


def _parallel_worker(rank, world, ckpt_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lora.framework.parallel import init_parallel

    torch.set_num_threads(1)
    tokens, pos = batch()
    out = {}
    init_parallel(expert_parallel=2)
    for model_type in ARCHS:  # Qwen3-MoE from the directory (modelopt's importer), the others in memory
        src = ckpt_dir if model_type == "qwen3_moe" else tiny_hf(model_type, seed=11)
        model = megatron_from_hf(src, spec="local")
        experts = model.decoder.layers[0].mlp.experts
        fc1 = torch.stack([e.linear_fc1.weight.detach().cpu() for e in experts.local_experts])  # (E/2, 2I, H)
        out[model_type] = {
            "logits": mcore_logits(model, tokens, pos),
            "experts": list(model.decoder.layers[0].mlp.local_expert_indices),
            "fc1": fc1,
        }
    init_parallel(tensor_parallel=2)
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):  # ours in memory, modelopt's from the dir
        src = ckpt_dir if model_type == "qwen3_moe" else tiny_hf(model_type, seed=11)
        model = megatron_from_hf(src, spec="local", sequence_parallel=False)
        logits = mcore_logits(model, tokens, pos)  # (b, s, V / 2): this rank's vocabulary half
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits)
        out[f"tp2-{model_type}"] = torch.cat(parts, dim=-1)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    try:
        megatron_from_hf(tiny_hf("olmoe"), spec="local", sequence_parallel=False)
        out["olmoe-tp2-error"] = ""
    except ValueError as exc:
        out["olmoe-tp2-error"] = str(exc)
    return out


@pytest.mark.slow
def test_expert_and_tensor_parallel_2_match_hf(tmp_path):
    qwen = tiny_hf("qwen3_moe", seed=11)
    qwen.save_pretrained(tmp_path)
    tokens, _ = batch()
    ranks = run_on_processes(_parallel_worker, 2, str(tmp_path), timeout=300)
    for model_type in ARCHS:
        hf = qwen if model_type == "qwen3_moe" else tiny_hf(model_type, seed=11)
        ref = hf_logits(hf, tokens)
        gate_up = hf.model.layers[0].mlp.experts.gate_up_proj.detach()  # (E, 2I, H)
        for r, res in enumerate(ranks):
            got = res[model_type]
            assert got["experts"] == [2 * r, 2 * r + 1], model_type  # each rank its experts
            assert torch.equal(got["fc1"], gate_up[2 * r : 2 * r + 2]), model_type
            assert_close(got["logits"], ref, f"{model_type} EP=2 rank {r}")
        if model_type != "olmoe":
            for r, res in enumerate(ranks):
                assert_close(res[f"tp2-{model_type}"], ref, f"{model_type} TP=2 rank {r}")
    for res in ranks:
        assert "q/k RMSNorm spans all heads" in res["olmoe-tp2-error"]


# ------------------------------------------------------------------------------------ Transformer Engine


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["te", "te-sequential"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_te_spec_matches_hf(megatron_world, model_type, spec, tmp_path):
    pytest.importorskip("transformer_engine.pytorch")
    hf = tiny_hf(model_type, seed=6)
    hf.save_pretrained(tmp_path)
    tokens, pos = batch()
    ref = hf_logits(hf, tokens)
    # TE's kernels (cuBLAS, fused RMSNorm) round differently from torch on CPU: same 1e-4 bound
    assert_close(mcore_logits(megatron_from_hf(hf, spec=spec), tokens, pos), ref, f"{model_type} {spec}")
    assert_close(mcore_logits(megatron_from_hf(tmp_path, spec=spec), tokens, pos), ref, f"{model_type} dir")
