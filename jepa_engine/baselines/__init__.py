"""Token-by-token decoding baseline: a decoder-only transformer that writes its action plan as tokens.

    cfg = DecoderConfig.matched(world_model_params)        # or DecoderConfig.from_name("tiny")
    model = Decoder(cfg)
    train_imitation(model, world_config, ImitationConfig(steps=2000))
    policy = DecoderPolicy(model, world_config)             # policy.decide(obs, goal) -> actions [H, A]
    decoding_cost(cfg, reasoning_tokens=64)                  # latency, tokens/s, bandwidth, joules
"""
from .config import PRESETS, DecoderConfig
from .cost import decision_rows, decoding_cost, peak_bandwidth
from .decoder import CACHE_FORMS, Decoder, DynamicKVCache, StaticKVCache
from .imitation import DecoderPolicy, ImitationConfig, expert_examples, imitation_loss, rollout_success, train_imitation
from .tokenizer import ActionTokenizer

__all__ = ["ActionTokenizer", "CACHE_FORMS", "Decoder", "DecoderConfig", "DecoderPolicy", "DynamicKVCache",
           "ImitationConfig", "PRESETS", "StaticKVCache", "decision_rows", "decoding_cost", "expert_examples",
           "imitation_loss", "peak_bandwidth", "rollout_success", "train_imitation"]
