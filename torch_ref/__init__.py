"""PyTorch reference: diffusers' Wan modules (the independent oracle) plus what diffusers lacks."""
