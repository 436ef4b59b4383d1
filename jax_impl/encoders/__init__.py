"""Text and image encoders of the Wan pipelines (UMT5, CLIP vision tower) in Flax NNX, with no torch import.

`umt5` and `clip` (the models), `text` and `image` (tokenizer / image preprocessing + model, the same call
signatures as `torch_ref.encoders`). Their configs and the prompt cleaning both sides share live in
`weights.configs.encoders` and `weights.configs.prompt`; their weights load through `jax_impl.loading`.
"""
