"""A small post-LN, BERT-style encoder written with torch, for tests of transformer encoders
(docs/algorithms.md section 9).

Each layer is ``h = LN(x + Attn(x, mask)); out = LN(h + MLP(h))``. The attention mask is a second
graph input, (batch, tokens) int64, turned into an additive bias ``(1 - mask) * -10000`` on the
attention scores before Softmax, as BERT does. ``skip`` leaves sublayers out exactly as removing
their residual block from the ONNX graph does: the LayerNorm after the join stays, so a skipped
attention gives ``h = LN(x)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.zoo import _quiet

VOCAB = 50
TYPES = 2


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ln2 = nn.LayerNorm(dim)

    def attention(self, x: Tensor, bias: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias
        context = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(context)

    def mlp(self, h: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(h)))

    def forward(self, x: Tensor, bias: Tensor, skip: tuple[str, ...] = ()) -> Tensor:
        h = self.ln1(x if "attention" in skip else x + self.attention(x, bias))
        return self.ln2(h if "mlp" in skip else h + self.mlp(h))


class Encoder(nn.Module):
    """Token and position embeddings (and token-type embeddings with ``token_types``: a third input), LayerNorm,
    ``layers`` post-LN layers; returns (batch, tokens, dim)."""

    def __init__(self, layers: int = 4, dim: int = 32, heads: int = 4, hidden: int = 64, tokens: int = 16,
                 token_types: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inputs = ("input_ids", "attention_mask") + (("token_type_ids",) if token_types else ())
        self.words = nn.Embedding(VOCAB, dim)
        self.types = nn.Embedding(TYPES, dim) if token_types else None
        self.positions = nn.Embedding(tokens, dim)
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(Layer(dim, heads, hidden) for _ in range(layers))
        with torch.no_grad():  # LayerNorms that are not the identity, as in a trained model
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)
        self.eval()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                skip: dict[int, tuple[str, ...]] | None = None) -> Tensor:
        tokens = input_ids.shape[1]
        x = self.words(input_ids) + self.positions.weight[:tokens]
        if token_type_ids is not None:
            x = x + self.types(token_type_ids)
        x = self.ln(x)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for k, layer in enumerate(self.layers):
            x = layer(x, bias, (skip or {}).get(k, ()))
        return x


def batch(model: Encoder, samples: int = 8, tokens: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's inputs, int64: random token ids and an attention mask with padding (sample i keeps its first
    tokens - i % (tokens // 2)), token types 0 then 1 (halfway through its real tokens) when the model reads them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (samples, tokens)).astype(np.int64)
    lengths = tokens - np.arange(samples) % (tokens // 2)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.int64)
    feeds = {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}
    if "token_type_ids" in model.inputs:
        feeds["token_type_ids"] = (np.arange(tokens)[None, :] >= lengths[:, None] // 2).astype(np.int64) * mask
    return feeds


def torch_output(model: Encoder, feeds: dict[str, np.ndarray], skip: dict[int, tuple[str, ...]] | None = None) -> np.ndarray:
    """The torch model's output on ``feeds``, with the sublayers named in ``skip`` (layer -> "attention"/"mlp") left out."""
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[name]) for name in model.inputs), skip=skip).numpy()


def export(model: Encoder, path: str | Path, exporter: str = "torchscript", tokens: int = 16) -> Path:
    """``model`` as ONNX with inputs ``model.inputs`` (batch, tokens) int64 and output "hidden" (batch, tokens,
    dim); the batch is dynamic, the tokens fixed. exporter: "torchscript" (dynamo=False, opset 17) or "dynamo"
    (opset 18)."""
    path = Path(path)
    inputs = list(model.inputs)
    example = tuple(torch.from_numpy(v) for v in batch(model, 2, tokens).values())
    with _quiet():
        if exporter == "torchscript":
            torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, input_names=inputs,
                              output_names=["hidden"], dynamic_axes={name: {0: "batch"} for name in inputs + ["hidden"]})
        elif exporter == "dynamo":
            dim = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, example, str(path), dynamo=True, opset_version=18, input_names=inputs,
                              output_names=["hidden"], dynamic_shapes=tuple({0: dim} for _ in inputs),
                              external_data=False, report=False, verify=False, optimize=True)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path
