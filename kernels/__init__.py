"""Fused Triton kernels for JEPA models, each with its PyTorch reference.

Every op has one public function: it validates its arguments, then runs the Triton kernel on CUDA
tensors (or under ``TRITON_INTERPRET=1``) and the PyTorch reference elsewhere.
"""
from ._launch import backend_for, interpreting, use_backend
from .latent_loss import latent_loss, latent_loss_reference

__all__ = ["backend_for", "interpreting", "use_backend", "latent_loss", "latent_loss_reference"]
from .ema import EMAPlan, ema_update_, ema_update_reference
from .masked_attention import masked_attention, masked_attention_reference  # noqa: E402

__all__ += ["masked_attention", "masked_attention_reference"]
from .elite_refit import elite_refit, elite_refit_reference  # noqa: E402
from .sample_actions import sample_actions, sample_actions_reference  # noqa: E402

__all__ += ["elite_refit", "elite_refit_reference", "sample_actions", "sample_actions_reference"]
