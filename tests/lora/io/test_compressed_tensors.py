"""``lora.export(..., format="compressed-tensors")`` read by its real consumer: transformers'
compressed-tensors integration (CPU, ``CompressedTensorsConfig(dequantize=True)``: the weights are
decompressed by the compressed-tensors library while loading, the model runs dense — no activation
quantization).

Reference (float64 where it computes): for each quantized linear / expert ``T = Q_w(R)·diag(1/s) + B·A'``
and ``W_fold = fake_quant(T, nvfp4)`` (svdq's fake-quant path, independent of the exporter's packing),
rounded to bfloat16 as compressed-tensors decompresses NVFP4 (``unpack_fp4_from_uint8`` yields bfloat16),
loaded into the unquantized model. The loaded weights equal it exactly (every element), so the logits
do too (same fp32 arithmetic; asserted within 1e-6 relative). Against our folded model without the bfloat16
rounding (weight-only fake quantization) the logits agree within 2e-2 relative (bfloat16's 2^-9 per weight).
Adapters are perturbed ("fine-tuned") first so the branch is not the decomposition.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lora
import svdq
from svdq import SVDQConfig
from svdq.experts import SVDQExperts
from svdq.formats import fake_quant
from svdq.layer import SVDQLinear
from tests.helpers.hf_moe import VOCAB, forward_loop_of, static_ranges_with_headroom, tiny_moe, token_batches

ct = pytest.importorskip("compressed_tensors")
CFG = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128)


def tiny_dense(seed: int = 0):
    import transformers as tf

    cfg = tf.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def _build(family: str):
    return tiny_dense() if family == "dense" else tiny_moe(family, experts_implementation="eager")


def _quantized(family: str):
    model = _build(family)
    svdq.quantize(model, CFG, forward_loop_of(token_batches(3)), progress=False, report=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a "fine-tuned" branch: factors moved off the decomposition
        for n, p in model.named_parameters():
            if n.endswith(("lora_down", "lora_up")):
                p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def _targets(T: torch.Tensor) -> torch.Tensor:
    """``fake_quant(T, nvfp4)``, each expert of a 3-D ``(E, out, in)`` its own tensor (own global scale)."""
    if T.dim() == 3:
        return torch.stack([_targets(t) for t in T])
    return fake_quant(T.float(), "nvfp4").double()


def _effective_dense(m: SVDQLinear) -> torch.Tensor:
    q = m.residual_weight(torch.float32).double()
    return q / m.smooth.double() + m.lora_up.double() @ m.lora_down.double()  # (out, in)


def _effective_experts(proj) -> torch.Tensor:
    q = proj.residual_weight(torch.float32).double()  # (E, out, in)
    s = proj.smooth.double()
    s = s.expand(proj.num_experts, -1) if s.dim() == 1 else s
    A, B = proj.lora_down.double(), proj.lora_up.double()
    A = A.expand(proj.num_experts, *A.shape) if A.dim() == 2 else A
    B = B.expand(proj.num_experts, *B.shape) if B.dim() == 2 else B
    return q / s.unsqueeze(1) + B @ A


def _reference(family: str, q, bf16: bool):
    """The unquantized model carrying ``W_fold`` of every quantized linear / expert."""
    ref = _build(family)
    rnd = (lambda t: t.to(torch.bfloat16).float()) if bf16 else (lambda t: t.float())
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, SVDQLinear):
                ref.get_submodule(name).weight.copy_(rnd(_targets(_effective_dense(m))))
            elif isinstance(m, SVDQExperts):
                target = ref.get_submodule(name)
                target.gate_up_proj.copy_(rnd(_targets(_effective_experts(m.fc1))))
                target.down_proj.copy_(rnd(_targets(_effective_experts(m.fc2))))
    return ref


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _load(out):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(  # the reference's implementations: same arithmetic
        out,
        quantization_config=CompressedTensorsConfig(dequantize=True),
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()


def _expert_names(family: str) -> tuple[str, tuple[str, str, str]]:
    if family == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def _decompress_experts_with_compressed_tensors(hf, out, family: str) -> None:
    """Replace the fused expert weights transformers loaded by compressed-tensors' own decompression of the
    per-expert tensors (``NVFP4PackedCompressor.decompress``, the global scale included), stacked as
    transformers' conversion stacks them (gate rows, then up rows), in the model dtype (transformers 5.25
    leaves its decompressed experts in bfloat16, unlike the dense layers)."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    scheme = qc.config_groups["group_0"]
    tensors = load_file(out / "model.safetensors")
    block, (gate, up, down) = _expert_names(family)

    def weight(prefix):
        state = {
            k: tensors[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale")
        }
        return NVFP4PackedCompressor.decompress(state, scheme)["weight"].float()

    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            experts = layer.mlp.experts
            E = experts.gate_up_proj.shape[0]
            p = [f"model.layers.{i}.{block}.experts.{e}" for e in range(E)]
            w1 = torch.stack([torch.cat([weight(f"{x}.{gate}"), weight(f"{x}.{up}")]) for x in p])
            experts.gate_up_proj = torch.nn.Parameter(w1, requires_grad=False)  # (E, 2I, H)
            experts.down_proj = torch.nn.Parameter(torch.stack([weight(f"{x}.{down}") for x in p]), False)


@pytest.mark.parametrize("family", ["dense", "qwen3_moe", "mixtral"])
def test_transformers_loads_compressed_tensors_export(family, tmp_path):
    q = _quantized(family)
    loop = forward_loop_of(token_batches(2, seed=3))
    exported = lora.export(q, tmp_path / "ct", format="compressed-tensors", forward_loop=loop, verbose=False)
    assert exported.report and all(r["weight_err"] < 0.2 for r in exported.report.values())
    hf = _load(tmp_path / "ct")  # every tensor name found (no missing key)
    if family != "dense":
        _decompress_experts_with_compressed_tensors(hf, tmp_path / "ct", family)
    ref = _reference(family, q, bf16=True)
    sd_hf, sd_ref = hf.state_dict(), ref.state_dict()
    assert sd_hf.keys() == sd_ref.keys()
    for k in sd_ref:  # every weight exactly the bfloat16-rounded fold; the rest copied
        assert sd_hf[k].dtype == sd_ref[k].dtype and torch.equal(sd_hf[k], sd_ref[k]), k
    ids = token_batches(1, seed=11)[0]
    with torch.no_grad():
        logits = hf(ids).logits
        assert _rel(logits, ref(ids).logits) < 1e-6
        assert _rel(logits, _reference(family, q, bf16=False)(ids).logits) < 2e-2

    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"  # NVFP4 = W4A4
    n_layers = 2
    gates = (
        []
        if family == "dense"
        else [
            f"model.layers.{i}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.gate"
            for i in range(n_layers)
        ]
    )
    assert qc["ignore"] == sorted(["lm_head", *gates])
    meta = cfg["svdq_export"]
    assert meta["format"] == "compressed-tensors" and meta["scheme"] == "NVFP4"
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    if family != "dense":
        em = meta["layers"]["model.layers.0.mlp.experts"]["projections"]
        mod = q.get_submodule("model.layers.0.mlp.experts")
        assert (
            em["fc1"]["layout"] == mod.fc1.layout == "shared-down" and em["fc1"]["rank"] == mod.fc1.rank > 0
        )
        names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        block = "block_sparse_moe" if family == "mixtral" else "mlp"
        E = q.get_submodule("model.layers.0.mlp.experts").num_experts
        for e in range(E):
            for nm in names:
                key = f"model.layers.0.{block}.experts.{e}.{nm}"
                assert tensors[f"{key}.weight_packed"].dtype == torch.uint8
                assert tensors[f"{key}.weight_scale"].dtype == torch.float8_e4m3fn
            g1 = tensors[f"model.layers.0.{block}.experts.{e}.{names[0]}.weight_global_scale"]
            g3 = tensors[f"model.layers.0.{block}.experts.{e}.{names[1]}.weight_global_scale"]
            assert torch.equal(g1, g3)  # gate and up share a global scale (vLLM's fused w13)
        assert not any("gate_up_proj" in k or "lora" in k for k in tensors)


@pytest.mark.parametrize("family", ["dense", "qwen3_moe"])
def test_input_global_scale_is_the_raw_range_with_the_layers_headroom(family, tmp_path):
    """``input_global_scale = 6·448 / amax`` with ``amax = max|x| · input_amax / max|x/s|`` over the export's
    forward_loop (svdq/DESIGN.md §20): the layer's static range, headroom included, in raw coordinates; on
    the calibration data the headroom is ``act_range_margin``."""
    q = _quantized(family)
    for i, batches in enumerate((token_batches(3), token_batches(2, seed=3))):  # calibration data, other
        ranges = static_ranges_with_headroom(q, forward_loop_of(batches))  # float64 reference
        out = tmp_path / f"ct{i}"
        lora.export(q, out, format="compressed-tensors", forward_loop=forward_loop_of(batches), verbose=False)
        tensors = load_file(out / "model.safetensors")
        checked = 0
        for name, m in q.named_modules():
            if isinstance(m, SVDQLinear):
                amax = {name: float(ranges[name])}
            elif isinstance(m, SVDQExperts):
                gate, up, down = _expert_names(family)[1]
                fc1, fc2 = ranges[f"{name}.fc1"], ranges[f"{name}.fc2"]
                amax = {f"{name}.{e}.{nm}": float(fc1[e]) for e in range(m.num_experts) for nm in (gate, up)}
                amax |= {f"{name}.{e}.{down}": float(fc2[e]) for e in range(m.num_experts)}
            else:
                continue
            for key, a in amax.items():
                scale = float(tensors[f"{key}.input_global_scale"])
                assert scale == pytest.approx(6 * 448 / a, rel=1e-6), key
                checked += 1
        assert checked >= 8
    # on the calibration data the range is act_range_margin times the raw maximum (a dense layer's input
    # there is the same as in calibration: the first layer's q/k/v projection)
    first = "model.layers.0.self_attn.q_proj"
    layer = q.get_submodule(first)
    x_max = static_ranges_with_headroom(q, forward_loop_of(token_batches(3)))[first]
    assert float(layer.input_amax) > 0 and CFG.act_range_margin == 16
    raw = {}
    h = layer.register_forward_pre_hook(
        lambda mod, a: raw.__setitem__("x", max(raw.get("x", 0.0), float(a[0].double().abs().max())))
    )
    with torch.no_grad():
        forward_loop_of(token_batches(3))(q)
    h.remove()
    assert float(x_max) == pytest.approx(CFG.act_range_margin * raw["x"], rel=1e-6)


def test_weight_only_scheme_and_errors(tmp_path):
    q = _quantized("qwen3_moe")
    with pytest.raises(ValueError, match="scheme NVFP4 .*forward_loop"):
        lora.export(q, tmp_path / "a", format="compressed-tensors", verbose=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="scheme must be one of"):
        lora.export(q, tmp_path / "b", format="compressed-tensors", scheme="W4A16", verbose=False)
    lora.export(q, tmp_path / "w", format="compressed-tensors", scheme="NVFP4A16", verbose=False)
    qc = json.loads((tmp_path / "w" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    assert not any("input_global_scale" in k for k in load_file(tmp_path / "w" / "model.safetensors"))
    hf = _load(tmp_path / "w")
    _decompress_experts_with_compressed_tensors(hf, tmp_path / "w", "qwen3_moe")
    ids = token_batches(1, seed=11)[0]
    with torch.no_grad():
        assert _rel(hf(ids).logits, _reference("qwen3_moe", q, bf16=True)(ids).logits) < 1e-6


@pytest.mark.xfail(
    strict=True,
    reason="transformers 5.25 CompressedTensorsDequantize decompresses MoE experts through a DummyModule "
    "holding weight_packed / weight_scale / weight_shape only: NVFP4's weight_global_scale is dropped, "
    "expert weights come out 1/g (~1e4) times too large (dense layers are right)",
)
def test_transformers_own_expert_decompression(tmp_path):
    q = _quantized("qwen3_moe")
    lora.export(q, tmp_path / "w", format="compressed-tensors", scheme="NVFP4A16", verbose=False)
    hf = _load(tmp_path / "w")
    ref = _reference("qwen3_moe", q, bf16=True)
    for i, layer in enumerate(hf.model.layers):
        got, want = layer.mlp.experts.gate_up_proj, ref.model.layers[i].mlp.experts.gate_up_proj
        assert _rel(got, want) < 1e-2
