"""Training: the I-JEPA trainer (``ijepa``), the world-model trainer (``world_model``), their configs
(``configs``), the run folder they share (``run_folder``: resume, config.json, metrics.jsonl), the
checkpoint format (``checkpoint``), Ctrl-C handling (``interrupt``), the EMA target (``ema``) and
data-parallel helpers (``distributed``). Submodules load on first import."""
