"""Export interop for torch models whose quantized layers are :class:`svdq.SVDQLinear` (no Megatron):

* :func:`export_modelopt_hf` — nvidia-modelopt's Hugging Face layout for NVFP4 SVDQuant
  (``quant_algo: NVFP4_SVD``: ``weight``, ``weight_scale``, ``weight_scale_2``, ``input_scale``,
  ``pre_quant_scale`` and the factors under modelopt's keys); see :mod:`svdq.interop.modelopt_hf`.
* :func:`export_folded_hf` / :func:`fold_branches` — the branch folded into the 4-bit weight (rank 0),
  for engines without low-rank support, with the error the fold adds; see :mod:`svdq.interop.fold`.
* :func:`export_peft` — the branches as a PEFT LoRA adapter (``adapter_model.safetensors`` +
  ``adapter_config.json``); see :mod:`svdq.interop.peft` for what such an adapter means.

Every exporter writes to a temporary directory renamed into place: no partial output on failure.
"""

from svdq.interop.fold import export_folded_hf, fold_branches, fold_layer, format_report
from svdq.interop.modelopt_hf import (
    build_hf_quant_config,
    export_modelopt_hf,
    hf_quantization_config,
    layer_quant_algo,
    modelopt_layer_tensors,
)
from svdq.interop.peft import export_peft, peft_adapter_config, residual_base_state_dict

__all__ = [
    "build_hf_quant_config",
    "export_folded_hf",
    "export_modelopt_hf",
    "export_peft",
    "fold_branches",
    "fold_layer",
    "format_report",
    "hf_quantization_config",
    "layer_quant_algo",
    "modelopt_layer_tensors",
    "peft_adapter_config",
    "residual_base_state_dict",
]
