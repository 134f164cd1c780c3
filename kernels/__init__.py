"""Fused Triton kernels for JEPA models, each with its PyTorch reference.

Every op has one public function: it validates its arguments, then runs the Triton kernel on CUDA
tensors (or under ``TRITON_INTERPRET=1``) and the PyTorch reference elsewhere.
"""
from ._launch import backend_for, interpreting, use_backend
from .elite_refit import elite_refit, elite_refit_reference
from .ema import EMAPlan, ema_update_, ema_update_reference
from .fused_linear import (fold_layernorm, fused_linear, fused_linear_reference, linear_goal_cost,
                           linear_goal_cost_reference)
from .latent_cost import latent_cost, latent_cost_reference
from .latent_loss import latent_loss, latent_loss_reference
from .masked_attention import masked_attention, masked_attention_reference
from .predictor_step import fused_mlp, fused_mlp_reference, window_attention, window_attention_reference
from .sample_actions import sample_actions, sample_actions_reference

__all__ = [
    "backend_for", "interpreting", "use_backend",
    "EMAPlan", "ema_update_", "ema_update_reference",
    "elite_refit", "elite_refit_reference",
    "fold_layernorm", "fused_linear", "fused_linear_reference", "linear_goal_cost", "linear_goal_cost_reference",
    "latent_cost", "latent_cost_reference",
    "latent_loss", "latent_loss_reference",
    "masked_attention", "masked_attention_reference",
    "fused_mlp", "fused_mlp_reference", "window_attention", "window_attention_reference",
    "sample_actions", "sample_actions_reference",
]
