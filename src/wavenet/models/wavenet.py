"""The WaveNet network of van den Oord et al. (2016), "WaveNet: A Generative Model for Raw Audio".

Pure PyTorch: no Lightning, no Hydra, so it can be imported, exported and generated from on its own.

Shapes: B batch, T time, C channels, Q quantization levels. Every layer runs on (B, C, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from wavenet.hyperparameters import check_network


class ResidualLayer(nn.Module):
    """One gated layer: dilated causal conv -> tanh * sigmoid -> 1x1 residual and 1x1 skip.

    The layer runs "valid" convolutions: its output is `dilation * (kernel_size - 1)` steps shorter than
    its input, and the residual path is cropped to match. Causal padding is done once, at the network's
    input, so no layer spends work on padding.
    """

    def __init__(
        self,
        residual_channels: int,
        dilation_channels: int,
        skip_channels: int,
        kernel_size: int,
        dilation: int,
        bias: bool,
        has_residual: bool,
    ) -> None:
        super().__init__()
        self.dilation = dilation
        self.kernel_size = kernel_size
        # Filter and gate in one convolution: one kernel launch and one read of the input instead of two.
        self.filter_gate = nn.Conv1d(
            residual_channels, 2 * dilation_channels, kernel_size, dilation=dilation, bias=bias
        )
        # The last layer's residual output would feed nothing, so it has none.
        self.residual = nn.Conv1d(dilation_channels, residual_channels, 1, bias=bias) if has_residual else None
        self.skip = nn.Conv1d(dilation_channels, skip_channels, 1, bias=bias)

    @property
    def context(self) -> int:
        """How many past samples this layer looks at beyond the current one."""
        return self.dilation * (self.kernel_size - 1)

    def gated(self, x: Tensor) -> Tensor:
        """(B, R, T) -> (B, D, T - context): the gated activation tanh(W_f * x) * sigmoid(W_g * x)."""
        filter_, gate = self.filter_gate(x).chunk(2, dim=1)
        return torch.tanh(filter_) * torch.sigmoid(gate)

    def forward(self, x: Tensor, skip_length: int) -> tuple[Tensor | None, Tensor]:
        """Returns the next layer's input and this layer's skip output for the last `skip_length` steps.

        Only the last `skip_length` steps reach the network's output, so the skip 1x1 runs on those alone.
        """
        z = self.gated(x)
        residual = None
        if self.residual is not None:
            residual = x[:, :, self.context :] + self.residual(z)
        return residual, self.skip(z[:, :, z.shape[-1] - skip_length :])


class WaveNet(nn.Module):
    """Autoregressive model of mu-law audio: logits of sample t + 1 given samples up to t.

    Args:
        layers: Number of residual layers in total.
        stacks: Number of repeats of the dilation cycle; `layers` must be a multiple of it. Dilations
            are 1, 2, ..., 2 ** (layers / stacks - 1) in each stack.
        residual_channels: Width of the residual stream.
        dilation_channels: Width of the gated activation (filter and gate each).
        skip_channels: Width of the skip connections and the output head.
        kernel_size: Taps of each dilated causal convolution (2 in the paper).
        quantization_channels: Number of mu-law classes, in and out (256 in the paper).
        bias: Whether convolutions carry a bias.
        checkpoint_activations: Whether training (grad enabled) keeps only each residual layer's input and
            recomputes the layer in backward: per step and layer R values stored instead of R + 3D, for one
            more forward of the layers; for chunks too long to fit otherwise. The result is the same.
    """

    def __init__(
        self,
        layers: int,
        stacks: int,
        residual_channels: int,
        dilation_channels: int,
        skip_channels: int,
        kernel_size: int = 2,
        quantization_channels: int = 256,
        bias: bool = True,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        check_network(
            {
                "layers": layers, "stacks": stacks, "residual_channels": residual_channels,
                "dilation_channels": dilation_channels, "skip_channels": skip_channels, "kernel_size": kernel_size,
                "quantization_channels": quantization_channels, "bias": bias,
                "checkpoint_activations": checkpoint_activations,
            }
        )  # fmt: skip
        self.layers_per_stack = layers // stacks
        self.kernel_size = kernel_size
        self.quantization_channels = quantization_channels
        self.checkpoint_activations = checkpoint_activations
        self.dilations = [2**i for _ in range(stacks) for i in range(self.layers_per_stack)]

        # A lookup table is a 1x1 convolution of the one-hot input, without building the one-hot.
        self.embedding = nn.Embedding(quantization_channels, residual_channels)
        self.layers = nn.ModuleList(
            ResidualLayer(
                residual_channels,
                dilation_channels,
                skip_channels,
                kernel_size,
                dilation,
                bias,
                has_residual=index < layers - 1,
            )
            for index, dilation in enumerate(self.dilations)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(skip_channels, skip_channels, 1, bias=bias),
            nn.ReLU(),
            nn.Conv1d(skip_channels, quantization_channels, 1, bias=bias),
        )

    @property
    def receptive_field(self) -> int:
        """Number of input samples that output t depends on (inputs t - receptive_field + 1 ... t)."""
        return 1 + sum(layer.context for layer in self.layers)

    def flops_per_step(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one output step of the forward pass; x3 for a training step."""
        macs = 0
        for layer in self.layers:
            conv = layer.filter_gate
            macs += conv.kernel_size[0] * conv.in_channels * conv.out_channels
            macs += sum(c.in_channels * c.out_channels for c in (layer.residual, layer.skip) if c is not None)
        macs += sum(c.in_channels * c.out_channels for c in self.head if isinstance(c, nn.Conv1d))
        return 2 * macs

    @property
    def silence_class(self) -> int:
        """The mu-law class of 0.0, used as the past before the first sample."""
        return self.quantization_channels // 2

    def forward(self, x: Tensor, causal_pad: bool = True) -> Tensor:
        """Logits of the next sample at every position.

        Args:
            x: (B, T) mu-law classes, int64 (or int32).
            causal_pad: If true, the input is treated as preceded by silence, and the output has one step
                per input step. If false, only the positions that see a full receptive field of real
                input are computed: T - receptive_field + 1 steps, the ones training uses.

        Returns:
            (B, Q, T) logits, or (B, Q, T - receptive_field + 1) without `causal_pad`. Output t is the
            distribution of the sample after input t.
        """
        # Dtype and rank only, free; a check of the values would sync with the GPU at every forward.
        if not isinstance(x, Tensor) or x.dtype not in (torch.int64, torch.int32):
            kind = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            audio = isinstance(x, Tensor) and x.is_floating_point()
            hint = ": audio? encode it with wavenet.mu_law_encode" if audio else ""
            raise TypeError(f"WaveNet expects x as (B, T) int64 mu-law classes, got {kind}{hint}")
        if x.dim() != 2:
            raise ValueError(f"WaveNet expects x as (B, T) mu-law classes, got shape {tuple(x.shape)}")
        steps = x.shape[1]
        if causal_pad:
            if steps < 1:
                raise ValueError("input of 0 steps: there is no position to predict from")
            x = F.pad(x, (self.receptive_field - 1, 0), value=self.silence_class)
        output_length = x.shape[-1] - self.receptive_field + 1
        if output_length < 1:
            raise ValueError(
                f"input of {steps} steps is shorter than the receptive field ({self.receptive_field}); "
                "causal_pad=True pads it with silence"
            )
        h = self.embedding(x).transpose(1, 2)  # (B, R, T)
        # Under no_grad (validation, generation) nothing is stored for backward, so nothing is recomputed.
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        skips = 0
        for layer in self.layers:
            if recompute:
                # Non-reentrant: works with torch.compile, and with inputs that do not require grad.
                h, skip = checkpoint(layer, h, output_length, use_reentrant=False)
            else:
                h, skip = layer(h, output_length)
            skips = skips + skip
        return self.head(skips)
