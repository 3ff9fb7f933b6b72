"""``SVDQConfig``: what to quantize and how. A small frozen dataclass (:class:`svdq.config_base.ConfigBase`),
buildable from a dict or JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

from svdq.config_base import ConfigBase
from svdq.formats import QuantFormat, parse_format

RESIDUAL_QUANTS = ("rtn", "gptq", "auto")
FC1_OBJECTIVES = ("output", "activation")
BRANCH_FITS = ("plain", "act-noise", "act-cross", "act-both")
#: ``SVDQConfig.act_range_margin`` default, chosen by bench/bench_accuracy.py (svdq/DESIGN.md §20)
DEFAULT_ACT_RANGE_MARGIN = 16.0
DEFAULT_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class SVDQConfig(ConfigBase):
    """Settings of the SVDQuant decomposition and of which layers ``svdq.quantize`` replaces.

    * ``weight_format`` / ``act_format``: ``"nvfp4"``, ``"int4"`` (``"int4-g128"`` …), ``"fp8"``, ``"none"``.
    * ``rank``: rank of the low-rank branch (the LoRA rank).
    * ``alphas``: smoothing-strength grid; each candidate is scored by the output error of the complete
      quantized layer (branch included) on the sampled calibration tokens. ``()`` disables smoothing.
    * ``refine_steps``: cap on branch/residual refinement steps; a step that lowers the output error by
      less than ``refine_tol`` (relative) is the last one.
    * ``residual_quant``: ``"rtn"`` (round-to-nearest), ``"gptq"`` (Hessian-aware, slower; kept only
      when it lowers the output error; needs an nvfp4 / int4 weight format) or ``"auto"`` (GPTQ where the
      weight format allows it, else RTN). Dense layers and experts use GPTQ only where they saw at least
      ``GPTQ_MIN_TOKENS_PER_INPUT`` (4) calibration tokens per input channel (per expert: its own
      Hessian ``X_iᵀX_i``); the result says which quantizer each layer / expert got.
    * ``whiten``: fit the branch to the output error ``‖(W − BA)Xᵀ‖`` instead of the weight error.
    * ``damp``: Cholesky damping, relative to the mean diagonal of ``XᵀX``.
    * ``include`` / ``exclude``: ``fnmatch`` patterns on module names (exclude wins).
    * ``sample_tokens``: calibration tokens kept per layer for scoring; ``score_rows``: output rows on
      which α candidates are scored (a fixed random subset for large layers).
    * ``act_range_margin``: headroom ``k ≥ 1`` of static activation ranges (svdq/DESIGN.md §5, §20): a layer's
      fixed per-tensor range is ``input_amax = k · max|x/s|`` over the calibration batches, so held-out
      activations up to ``k`` times the calibrated maximum are not clipped (larger ones clip as the format
      does). For nvfp4 the range only sets the float32 global scale under which the per-block E4M3 scales
      live, so ``k`` costs precision only in blocks whose maximum is below ``k · max / 28672`` (``448 · 2⁶``:
      their E4M3 scales turn subnormal); for per-tensor fp8 the same holds for single values. Formats
      without a per-tensor range (int4, per-channel fp8, none) are always dynamic and ignore it.
    * ``fc1_objective``: what the experts' fc1 decisions (smoothing α, layout, refinement, GPTQ) minimize:
      ``"output"`` the error of ``fc1(x)``, ``"activation"`` that of its consumer ``act(fc1(x) + b)`` (a
      GLU's ``act(gate)·up``: errors of gate and up weighted by what the expert passes on; svdq/DESIGN.md
      §20). Dense linears and fc2 always use their output error.
    * ``branch_fit``: how expert groups fit their branch to the activation-quantization error (svdq/DESIGN.md
      §23): ``"plain"`` the whitened fit alone; ``"act-noise"`` adds, after the α search, a refit whose
      covariance includes the activation-error second moment (``Ĉ_i + N_i/ρ²``), kept if it lowers the
      error; ``"act-cross"`` makes refinement fit the exact error of the fixed quantized residual (target
      ``W_i − R̂_i/s + R̂_i·K_i·Ĉ_i⁻¹``); ``"act-both"`` both. Dense linears always fit plainly.
    * ``weight_only_fallback``: a targeted layer that saw no calibration data is decomposed from its
      weight alone (no smoothing, no whitening) and flagged, instead of raising.
    """

    weight_format: str = "nvfp4"
    act_format: str = "nvfp4"
    rank: int = 32
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    refine_steps: int = 1
    refine_tol: float = 1e-3
    residual_quant: str = "rtn"
    whiten: bool = True
    damp: float = 0.01
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ("*lm_head*", "*output_layer*")
    sample_tokens: int = 512
    score_rows: int = 2048
    oversample: int = 16
    power_iters: int = 2
    act_range_margin: float = DEFAULT_ACT_RANGE_MARGIN
    fc1_objective: str = "output"
    branch_fit: str = "plain"
    weight_only_fallback: bool = False
    seed: int = 0

    def normalize(self) -> None:
        for name in ("alphas", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        parse_format(self.weight_format)  # raises on an unknown format string
        parse_format(self.act_format)
        if self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be ≥ 0, got {self.refine_steps}")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas must lie in [0, 1], got {self.alphas}")
        if self.residual_quant not in RESIDUAL_QUANTS:
            raise ValueError(f"residual_quant must be one of {RESIDUAL_QUANTS}, got {self.residual_quant!r}")
        if self.residual_quant == "gptq" and parse_format(self.weight_format).name not in ("nvfp4", "int4"):
            raise ValueError(
                f"residual_quant='gptq' needs an nvfp4 or int4 weight format, not {self.weight_format}"
            )
        if self.damp < 0:
            raise ValueError(f"damp must be ≥ 0, got {self.damp}")
        if self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be ≥ 1, got {self.sample_tokens}")
        if not self.act_range_margin >= 1.0:
            raise ValueError(f"act_range_margin must be ≥ 1, got {self.act_range_margin}")
        if self.fc1_objective not in FC1_OBJECTIVES:
            raise ValueError(f"fc1_objective must be one of {FC1_OBJECTIVES}, got {self.fc1_objective!r}")
        if self.branch_fit not in BRANCH_FITS:
            raise ValueError(f"branch_fit must be one of {BRANCH_FITS}, got {self.branch_fit!r}")
        if self.score_rows < 1:
            raise ValueError(f"score_rows must be ≥ 1, got {self.score_rows}")

    @property
    def weight_quant(self) -> QuantFormat:
        return parse_format(self.weight_format)

    @property
    def act_quant(self) -> QuantFormat:
        return parse_format(self.act_format)

    @property
    def use_gptq(self) -> bool:
        """GPTQ residuals wanted (``"gptq"``, or ``"auto"`` with an nvfp4 / int4 weight format)."""
        return self.residual_quant == "gptq" or (
            self.residual_quant == "auto" and self.weight_quant.name in ("nvfp4", "int4")
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SVDQConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def preset(cls, name: str) -> SVDQConfig:
        """A named preset: one of :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, SVDQConfig] = {
    "nvfp4-w4a4-r32": SVDQConfig(weight_format="nvfp4", act_format="nvfp4", rank=32),
    "int4-w4a4-r32": SVDQConfig(weight_format="int4", act_format="int4", rank=32),
    "nvfp4-w4a16-r32": SVDQConfig(weight_format="nvfp4", act_format="none", rank=32),
}
