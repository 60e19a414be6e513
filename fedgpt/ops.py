"""Fast paths the model takes where torch's own kernel is slow: the tanh GELU on CPU float32."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# The tanh GELU, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), is x·sigmoid(K0·x + K1·x³),
# since 1 + tanh(z) = 2·sigmoid(2z).
GELU_K0 = 2 * math.sqrt(2 / math.pi)
GELU_K1 = GELU_K0 * 0.044715


class _SigmoidTanhGELU(torch.autograd.Function):
    """The tanh GELU through sigmoid, which ATen computes faster than tanh on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # sigmoid(K0 x + K1 x³)
        s = torch.addcmul(x.new_tensor(GELU_K0), x, x, value=GELU_K1).mul_(x).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s = ctx.saved_tensors
        p = torch.addcmul(x.new_tensor(GELU_K0), x, x, value=3 * GELU_K1).mul_(x)  # x·(K0 + 3·K1·x²)
        return torch.addcmul(s, s, s, value=-1).mul_(p).add_(s).mul_(grad)  # grad·(s + s·(1 - s)·p)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), faster for float32 on CPU (equal to within float32 rounding)."""
    # Elsewhere ATen's fused kernel wins (CUDA, reduced precision), and torch.compile fuses F.gelu itself.
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return _SigmoidTanhGELU.apply(x)
    return F.gelu(x, approximate="tanh")
