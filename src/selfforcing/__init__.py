"""selfforcing: train autoregressive video diffusion models with Self Forcing and stream them in real time."""

__version__ = "0.1.0"
