"""JEPA models: ViT encoder, predictor, world model."""
