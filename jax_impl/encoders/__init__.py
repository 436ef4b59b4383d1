"""Text and image encoders of the Wan pipelines (UMT5, CLIP vision tower) in Flax NNX, with no torch import.

`config` (configs, framework-free), `prompt` (prompt cleaning), `umt5` and `clip` (the models), `text` and
`image` (tokenizer / image preprocessing + model, the same call signatures as `torch_ref.encoders`).
"""
