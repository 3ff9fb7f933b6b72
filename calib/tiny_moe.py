"""A tiny, seeded Megatron GPT-MoE: GLU (SwiGLU) experts, top-2 routing; local spec with SequentialMLP
experts by default, or the Transformer Engine spec (GPU hosts with TE).

Small enough to train on a 2-core CPU in seconds; the same builder makes bigger models for the
quickstart and GPU runs. Call :func:`lora.framework.init_parallel` first.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora.framework import compat

SPECS = ("local", "te", "te-sequential")
DTYPES = ("float32", "bfloat16", "float16")
FP8_MODES = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")


@dataclass(frozen=True)
class TinyMoEConfig:
    """Shape of the tiny GPT-MoE. ``ffn_hidden`` is each expert's intermediate size (fc1 out = 2·ffn).

    ``sequence_parallel``: ``None`` → on when tensor parallelism > 1 (Megatron's usual setting). Pass
    ``False`` to run TP > 1 on CPU: the torch RMSNorm of the local spec refuses sequence parallelism
    there. Without it every TP rank holds the whole sequence, and Megatron's allgather dispatcher hands
    each token to the experts once per TP rank (expert token counts are TP× those of TP=1; outputs are
    unchanged). MoE layers then refuse to *train* (``model.train()``); run such models in eval mode.

    ``spec``: ``"local"`` (Megatron's local modules, SequentialMLP experts; runs on CPU), ``"te"``
    (Transformer Engine modules, ``TEGroupedMLP`` experts) or ``"te-sequential"`` (TE modules,
    ``SequentialMLP`` of TE linears). The weights depend on the seed and the parameter names only, so the
    three specs build the same model (TE fuses the input norms into ``linear_qkv``; norms start at one).
    ``fp8``: Megatron's FP8 mode (``"hybrid"`` / ``"e4m3"``, TE specs only) with ``fp8_recipe``
    (``"delayed"`` = TE ``DelayedScaling``, ``"tensorwise"`` = ``Float8CurrentScaling``).
    """

    num_layers: int = 2
    hidden: int = 64
    heads: int = 4
    num_experts: int = 4
    ffn_hidden: int = 64
    topk: int = 2
    vocab_size: int = 256
    seq_len: int = 32
    dtype: str = "float32"
    sequence_parallel: bool | None = None
    spec: str = "local"
    fp8: str | None = None
    fp8_recipe: str = "delayed"

    def __post_init__(self) -> None:
        from svdq.config_base import check_field_types

        check_field_types(self)  # ValueError naming the field: wrong types, non-finite numbers
        for name in ("num_layers", "hidden", "heads", "num_experts", "ffn_hidden", "topk", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyMoEConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.seq_len < 1:
            raise ValueError(f"TinyMoEConfig.seq_len must be ≥ 1, got {self.seq_len}")
        if self.hidden % self.heads:
            raise ValueError(f"TinyMoEConfig.hidden {self.hidden} must be a multiple of heads {self.heads}")
        if self.topk > self.num_experts:
            raise ValueError(f"TinyMoEConfig.topk {self.topk} must be at most num_experts {self.num_experts}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TinyMoEConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.fp8 is not None and self.fp8 not in FP8_MODES:
            raise ValueError(f"TinyMoEConfig.fp8 must be None or one of {FP8_MODES}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(
                f"TinyMoEConfig.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}"
            )
        if self.spec not in SPECS:
            raise ValueError(f"TinyMoEConfig.spec must be one of {SPECS}, got {self.spec!r}")
        if self.fp8 is not None and self.spec == "local":
            raise ValueError("TinyMoEConfig.fp8 needs a Transformer Engine spec ('te' or 'te-sequential')")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyMoEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TinyMoEConfig fields: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as exc:  # a required field missing (none is today) or a bad call
            raise ValueError(f"TinyMoEConfig: {exc}") from None


def transformer_config(cfg: TinyMoEConfig):
    """The Megatron ``TransformerConfig`` for ``cfg`` under the current parallel state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    dtype = getattr(torch, cfg.dtype)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.heads,
        ffn_hidden_size=4 * cfg.hidden,
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.ffn_hidden,
        moe_router_topk=cfg.topk,
        moe_token_dispatcher_type="allgather",  # alltoall creates a CUDA stream
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1 if cfg.sequence_parallel is None else bool(cfg.sequence_parallel),
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=0.02,
        moe_grouped_gemm=cfg.spec == "te",
        **({"fp8": cfg.fp8, "fp8_recipe": cfg.fp8_recipe} if cfg.fp8 else {}),
    )


def build_tiny_gpt_moe(cfg: TinyMoEConfig = TinyMoEConfig(), seed: int = 1234):
    """Build a Megatron ``GPTModel`` for ``cfg`` with deterministic weights (same ``seed`` → same model).

    Requires :func:`lora.framework.init_parallel`. Experts are split over expert-parallel ranks the
    Megatron way; the full (unsharded) value of every weight depends on neither the expert-parallel nor
    the (expert) tensor-parallel size: a TP=2 / EP=2 model is the TP=1 model, sharded.
    On CUDA the model is moved to the current device.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=compat.moe_layer_spec(cfg.num_experts, cfg.spec),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_len,
        position_embedding_type="rope",
    )
    _init_by_global_name(model, seed, config.init_method_std, config.num_layers)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def _init_by_global_name(model, seed: int, std: float, num_layers: int) -> None:
    """Re-draw every weight matrix from a generator keyed by (seed, global name), then keep this rank's
    tensor-parallel shard of it.

    The global name of an expert parameter uses its *global* expert index. Megatron draws weights
    from one RNG stream in construction order, so the values would otherwise depend on how many
    experts this rank builds (and all expert-parallel ranks would get identical experts on CPU,
    hiding checkpoint bugs that swap experts between ranks). The full tensor is drawn on every rank and
    sharded the Megatron way (``partition_dim``; a gated fc1 keeps ``[gate_k; up_k]``), so a parameter's
    value depends only on the seed, its global name and its shard — not on the expert- or
    tensor-parallel size. Norm weights (ones) are left alone. Output projections (``linear_proj``,
    ``linear_fc2``) use ``std / sqrt(2 · num_layers)`` as Megatron does.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.experts import SequentialMLP

    from lora.framework.te import is_te_grouped_mlp
    from lora.framework.tp import full_shape, take_shard

    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tp = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    etp = (
        parallel_state.get_expert_tensor_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    glu = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    global_names = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, SequentialMLP):
            for i, expert in enumerate(module.local_experts):
                g = ep_rank * module.num_local_experts + i
                for pname, p in expert.named_parameters():
                    global_names[p] = (f"{mod_name}.global_expert{g}.{pname}", etp)
        elif is_te_grouped_mlp(module):  # weight{i} of the grouped linears: expert i's linear_fcX.weight
            for proj in ("linear_fc1", "linear_fc2"):
                linear = getattr(module, proj)
                for i in range(module.num_local_experts):
                    g = ep_rank * module.num_local_experts + i
                    p = getattr(linear, f"weight{i}")
                    global_names[p] = (f"{mod_name}.global_expert{g}.{proj}.weight", etp)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        gname, (tp_rank, tp_size) = global_names.get(p, (name, tp))
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        key = zlib.crc32(f"{seed}:{gname}:0".encode())
        scale = std / (2 * num_layers) ** 0.5 if ("linear_proj" in gname or "linear_fc2" in gname) else std
        fresh = torch.randn(
            full_shape(tuple(p.shape), dim, tp_size), generator=torch.Generator().manual_seed(key)
        )
        gated = glu and dim == 0 and gname.endswith("linear_fc1.weight")
        with torch.no_grad():
            p.copy_((take_shard(fresh, dim, tp_rank, tp_size, gated) * scale).to(p.dtype))


def tiny_moe_batch(cfg: TinyMoEConfig, batch: int = 4, seed: int = 0, device=None) -> dict:
    """A fixed random language-modelling batch: ``tokens``/``labels`` (batch × seq), ``position_ids``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pos = torch.arange(cfg.seq_len).unsqueeze(0).expand(batch, -1)
    return {
        "tokens": tokens[:, :-1].contiguous().to(device),
        "labels": tokens[:, 1:].contiguous().to(device),
        "position_ids": pos.contiguous().to(device),
    }
