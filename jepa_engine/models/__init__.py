"""JEPA models: ViT encoder, predictor, world model."""
from jepa_engine.models.blocks import Block, sincos_pos_embed_2d
from jepa_engine.models.predictor import PREDICTOR_PRESETS, Predictor, PredictorConfig
from jepa_engine.models.vit import VIT_PRESETS, VisionTransformer, ViTConfig
from jepa_engine.models.world_model import WM_PRESETS, WorldModel, WorldModelConfig, sigreg

__all__ = ["Block", "sincos_pos_embed_2d", "ViTConfig", "VisionTransformer", "VIT_PRESETS",
           "PredictorConfig", "Predictor", "PREDICTOR_PRESETS",
           "WorldModelConfig", "WorldModel", "WM_PRESETS", "sigreg"]
