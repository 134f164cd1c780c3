"""Evaluation of trained models: model-predictive control in the built-in world (``mpc``), linear
probes of the physical state (``probe``), and surprise at physically impossible events (``surprise``).
Submodules load on first import."""
