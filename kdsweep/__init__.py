"""kdsweep: Optuna sweeps for matched-budget MLP/CNN (Q1) and knowledge distillation (Q2)."""

__version__ = "0.2.0"
