"""Mu-law companding (ITU-T G.711), the paper's 8-bit quantization of audio."""

from __future__ import annotations

import torch
import torchaudio.functional as AF
from torch import Tensor


def mu_law_encode(audio: Tensor, quantization_channels: int = 256) -> Tensor:
    """Float audio in [-1, 1] -> int64 classes in [0, quantization_channels).

    Equal to `torchaudio.functional.mu_law_encoding` on [-1, 1]; values outside are clipped first, where
    torchaudio would return classes out of range (a crash, or a silent wrong target, in the loss).
    """
    if not audio.is_floating_point():
        raise TypeError(f"mu_law_encode expects float audio, got {audio.dtype}")
    return AF.mu_law_encoding(audio.clamp(-1.0, 1.0), quantization_channels)


def mu_law_decode(classes: Tensor, quantization_channels: int = 256) -> Tensor:
    """Int classes in [0, quantization_channels) -> float32 audio in [-1, 1]; `torchaudio`'s decoding."""
    return AF.mu_law_decoding(classes, quantization_channels).to(torch.float32)
