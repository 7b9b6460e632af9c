"""Sum of per-sample clipped gradients in one backward pass, without storing them.

Opacus' hooks materialise every per-sample gradient (for the product's D at 28x28, 108 k numbers
per record), copy it into a zero-filled buffer, take its norm, and sum it again, clipped. This
module computes the same clipped sum the "book-keeping" way (Bu et al. 2023): one forward pass
keeps each layer's input, one ``autograd.grad`` call returns each layer's output gradient, and
from those two the per-sample norms are found layer by layer -- by the ghost-norm identity
(Li et al. 2022) where that is cheaper than forming the per-sample gradient, which it is for the
deep convolutions with few positions -- and then the clipped sum as one weighted product.

Privacy assumption: the clipped sum it returns is exactly Opacus' (clip factor
``min(1, C / (norm + 1e-6))`` on each record's whole-model gradient norm): it is tested equal to
per-example autograd and to Opacus within float tolerance (tests/test_bookkeeping.py), so the
Gaussian mechanism and Opacus' accounting of it are unchanged. It supports exactly the layer
types of the product's discriminator and refuses anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.Embedding, nn.GroupNorm)


# Records per unfold on a CPU: keeps the patch matrices small enough to stay in cache (the whole
# batch of 256 in one chunk took 1.37x as long at 28x28, 1.10x at 64x64, on this project's 2-core
# CPU). A GPU takes the batch at once.
CPU_CHUNK = 64


@contextmanager
def _full_float32_convolutions() -> Iterator[None]:
    """cuDNN may round convolutions to TF32 (10-bit mantissa) on a GPU: the clipped sum must be
    computed as precisely as the norms that clipped it, as Opacus' float32 einsum is."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _product_norms(inputs: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of each record's weight gradient ``grads[i] @ inputs[i]^T``
    (inputs ``[n, p, T]``, output gradients ``[n, q, T]``, T positions per record).

    Ghost norm ``<A^T A, G^T G>`` costs T^2 (p + q) per record, forming the gradient T p q: take
    the cheaper one."""
    p, positions = inputs.shape[1:]
    q = grads.shape[1]
    if positions * (p + q) < p * q:
        gram_a = torch.bmm(inputs.transpose(1, 2), inputs)
        return (gram_a * torch.bmm(grads.transpose(1, 2), grads)).sum((1, 2))
    return torch.bmm(grads, inputs.transpose(1, 2)).pow(2).sum((1, 2))


class _Layer:
    """One parameterised layer's input and output gradient for a batch, and what follows from them."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor, grads: torch.Tensor) -> None:
        self.module, self.inputs, self.grads = module, inputs, grads
        n = grads.shape[0]
        m = module
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m.bias is not None:  # each record's bias gradient; the weight's norm and sum come later
                self.bias_rows = grads.sum((2, 3)) if isinstance(m, nn.Conv2d) else grads.reshape(n, -1, m.out_features).sum(1)
        elif isinstance(m, nn.GroupNorm):  # per-sample gradients are small: form them
            normalised = F.group_norm(inputs, m.num_groups, eps=m.eps).reshape(n, m.num_channels, -1)
            flat = grads.reshape(n, m.num_channels, -1)
            self.weight_rows, self.bias_rows = (flat * normalised).sum(2), flat.sum(2)
        elif inputs.dim() != 1:  # nn.Embedding: one index per record is what the rule below assumes
            raise ValueError("book-keeping clipping supports an Embedding looked up once per record; "
                             "use --grad-sample-mode hooks")
        # nn.Embedding, one index per record: the record's gradient is its output gradient, in its row

    def _weight_norms2(self) -> torch.Tensor:
        m, n = self.module, self.grads.shape[0]
        if isinstance(m, nn.Linear):
            return _product_norms(self.inputs.reshape(n, -1, m.in_features).transpose(1, 2),
                                  self.grads.reshape(n, -1, m.out_features).transpose(1, 2))
        parts = []
        chunk = len(self.inputs) if self.inputs.is_cuda else CPU_CHUNK
        for a, g in zip(self.inputs.split(chunk), self.grads.split(chunk)):
            patches = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # [chunk, c k k, T]
            parts.append(_product_norms(patches, g.reshape(len(g), m.out_channels, -1)))
        return torch.cat(parts)

    def norms2(self) -> torch.Tensor:
        """Each record's squared gradient norm over this layer's parameters."""
        m = self.module
        if isinstance(m, nn.Embedding):
            return self.grads.pow(2).sum(1)
        if isinstance(m, nn.GroupNorm):
            total = self.weight_rows.pow(2).sum(1) if m.weight is not None else 0.0
        else:
            total = self._weight_norms2()
        if m.bias is not None:
            total = total + self.bias_rows.pow(2).sum(1)
        return total

    def clipped_sums(self, factor: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """This layer's parameters' sums of per-sample gradients scaled by ``factor``: each
        weight's as one ordinary weight-gradient product of the inputs and scaled output gradients."""
        m = self.module
        if isinstance(m, nn.Embedding):
            return {m.weight: torch.zeros_like(m.weight).index_add_(0, self.inputs, self.grads * factor[:, None])}
        out = {}
        if isinstance(m, nn.GroupNorm):
            if m.weight is not None:
                out[m.weight] = factor @ self.weight_rows
        elif isinstance(m, nn.Conv2d):
            scaled = self.grads * factor[:, None, None, None]
            with _full_float32_convolutions():
                out[m.weight] = torch.nn.grad.conv2d_weight(self.inputs, m.weight.shape, scaled, m.stride, m.padding,
                                                            m.dilation)
        else:
            scaled = (self.grads * factor.view(-1, *[1] * (self.grads.dim() - 1))).reshape(-1, m.out_features)
            out[m.weight] = scaled.t() @ self.inputs.reshape(-1, m.in_features)
        if m.bias is not None:
            out[m.bias] = factor @ self.bias_rows
        return out


class BookkeepingClipper:
    """The per-sample clipped gradient sum of ``model``'s BCE loss on a batch, in one pass.

    ``model`` must be built from Conv2d (no groups, zero padding), Linear, Embedding (one index
    per record) and GroupNorm layers plus parameter-free ones, and call each layer once."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        for m in self.layers:
            if not isinstance(m, SUPPORTED_LAYERS):
                raise ValueError(f"book-keeping clipping does not support {type(m).__name__} layers; "
                                 "use --grad-sample-mode hooks")
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise ValueError("book-keeping clipping supports only ungrouped, zero-padded Conv2d with numeric "
                                 "padding; use --grad-sample-mode hooks")
            if isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.max_norm is not None):
                raise ValueError("book-keeping clipping does not support Embedding padding_idx or max_norm; "
                                 "use --grad-sample-mode hooks")

    def clipped_sum(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                    max_grad_norm: float) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
        """Sum over the records of their BCE-loss gradients, each clipped to ``max_grad_norm``,
        and the logits (detached). An empty batch gives zero sums."""
        if len(images) == 0:  # an empty Poisson batch: its clipped sum is zero
            return {p: torch.zeros_like(p) for p in self.model.parameters()}, images.new_zeros(0)
        captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        hooks = [m.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0].detach(), out)))
                 for m in self.layers]
        try:
            logits = self.model(images, labels)
        finally:
            for h in hooks:
                h.remove()
        if sorted(map(id, (c[0] for c in captured))) != sorted(map(id, self.layers)):
            raise ValueError("book-keeping clipping needs every layer called exactly once per forward pass")
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        grads = torch.autograd.grad(loss, [out for _, _, out in captured])
        layers = [_Layer(m, inputs, g) for (m, inputs, _), g in zip(captured, grads)]
        norms = torch.sqrt(sum(layer.norms2() for layer in layers))
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for layer in layers:
            sums.update(layer.clipped_sums(factor))
        return sums, logits.detach()
