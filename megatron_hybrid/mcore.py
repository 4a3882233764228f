"""The one module that imports Megatron-Core internals (pinned: megatron-core 0.16.1).

Everything else in megatron_hybrid reaches Megatron-Core through the names here, so a
Megatron-Core rename (``MambaModel`` -> ``HybridModel`` in later releases) is absorbed in
one place. Importing this module requires an installed backend (see ``backends.install``):
Megatron-Core binds its Mamba kernels at import time.
"""

# ruff: noqa: E402, F401
import importlib.util
import sys


def _require_mamba_kernels() -> None:
    if "mamba_ssm" not in sys.modules and importlib.util.find_spec("mamba_ssm") is None:
        raise ImportError("Megatron-Core imported before a backend was installed: call "
                          "megatron_hybrid.backends.install() first")


_require_mamba_kernels()

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import mapping as dist_checkpointing_mapping
from megatron.core.dist_checkpointing.strategies import torch as dist_checkpointing_torch
from megatron.core.activations import squared_relu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.inference.contexts import DynamicInferenceContext, StaticInferenceContext
from megatron.core.inference.contexts import dynamic_context as dynamic_context_module
from megatron.core.inference import communication_utils as inference_communication_module
from megatron.core.inference.engines import DynamicInferenceEngine
from megatron.core.inference.engines import StaticInferenceEngine
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
    InferenceWrapperConfig,
)
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm import mamba_mixer as mamba_mixer_module
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel import random as tensor_parallel_random
from megatron.core.transformer.attention import (
    Attention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.moe import moe_utils as moe_utils_module
from megatron.core.transformer.moe import token_dispatcher as token_dispatcher_module
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import get_mamba_inference_state_config_from_model


def te_mamba_stack_spec() -> "ModuleSpec":
    """Megatron-Core's own Transformer-Engine + mamba_ssm stack spec (cuda backend only)."""
    from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

    return mamba_stack_spec


def gradient_accumulation_fusion_available() -> bool:
    """Whether apex's fused_weight_gradient_mlp_cuda is there: Megatron-Core's linears refuse
    ``gradient_accumulation_fusion`` without it (NVIDIA's container ships apex)."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available


def te_norm_class():
    """Transformer Engine's norm, as Megatron-Core's MambaStack uses for its final norm."""
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def te_checkpoint(*args, **kwargs):
    """Transformer Engine's activation checkpoint, which recomputes FP8 layers in FP8 (as
    Megatron-Core's TransformerBlock uses it when ``config.fp8`` is set; cuda backend only)."""
    from megatron.core.extensions.transformer_engine import te_checkpoint as checkpoint

    return checkpoint(*args, **kwargs)


def initialize_te_userbuffers(*, shape: list[int], tp_size: int, use_fp8: bool,
                              bf16_layers: bool, dtype) -> None:
    """Transformer Engine's userbuffers, which TransformerConfig.tp_comm_overlap needs before
    the model is built (Megatron-LM's ``_initialize_tp_communicators``, its default
    configuration). Transformer Engine 2.7 and later (it has UserBufferQuantizationMode)
    registers FP8 and bf16 buffers apart: an FP8 run with bf16 layers needs both."""
    from transformer_engine.pytorch.module import base

    modes = getattr(base, "UserBufferQuantizationMode", None)
    if modes is None:
        precision = {"use_fp8": use_fp8}
    else:
        precision = {"quantization_modes": [mode for mode, wanted in (
            (modes.FP8, use_fp8), (modes.NONE, bf16_layers)) if wanted]}
    base.initialize_ub(shape=shape, tp_size=tp_size, dtype=dtype, ub_cfgs=None,
                       bootstrap_backend="nccl", **precision)


def destroy_te_userbuffers() -> None:
    """Free what :func:`initialize_te_userbuffers` set up, so a later session may set it up
    again (Transformer Engine allows one initialisation at a time)."""
    from transformer_engine.pytorch.module import base

    base.destroy_ub()
