"""Hand-written GPU kernels (Triton) for inference; optional: nothing else in the package imports them.

`fused_step.fused_steps` runs many autoregressive generation steps of a whole WaveNet in one launch. The
kernels also run on CPU tensors through Triton's interpreter (slow, for tests), never switched on
behind the user's back.
"""
