"""The networks of the paper's Fig. 1 and Fig. 2 experiments."""

from __future__ import annotations

import torch
from torch import nn


def tanh_mlp(inputs: int, hidden: list[int], outputs: int) -> nn.Sequential:
    """``Linear → Tanh`` for every hidden width, then a Linear output layer."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def fig1_network() -> nn.Sequential:
    """6 inputs, three hidden layers of 16 tanh units, 10 outputs (Section 4)."""
    return tanh_mlp(6, [16, 16, 16], 10)


def fig2a_network(outputs: int) -> nn.Sequential:
    """64 inputs, one hidden layer of 512 tanh units, ``outputs`` outputs (Fig. 2a)."""
    return tanh_mlp(64, [512], outputs)


def fig2b_network(layers: int) -> nn.Sequential:
    """64 inputs, ``layers`` hidden layers of 512 tanh units, 100 outputs (Fig. 2b)."""
    return tanh_mlp(64, [512] * layers, 100)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ResidualTanhMLP(nn.Module):
    """``inputs → width``, then residual blocks ``h + W₂ tanh(W₁ h)`` each followed by a tanh,
    then ``width → outputs``: a graph with fan-out at every block."""

    def __init__(self, inputs: int, width: int, blocks: int, outputs: int):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.act = nn.Tanh()
        self.head = nn.Linear(width, outputs)
        self.out_features = outputs

    def forward(self, x):
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = self.act(h + block(h))
        return self.head(h)


def residual_network(blocks: int = 4) -> ResidualTanhMLP:
    """The Fig. 2b network's size as a residual MLP: 64 inputs, ``blocks`` blocks of two
    512-wide tanh layers, 100 outputs."""
    return ResidualTanhMLP(64, 512, blocks, 100)


# --- Fig. 1's protocol on graphs: networks of the Fig. 1 size (6 inputs, width 16, 10 outputs)


class GatedMLP(nn.Module):
    """A SwiGLU block ``W₃ (silu(W₁x) ⊙ W₂x)`` between a tanh input layer and a linear head."""

    def __init__(self, inputs: int = 6, width: int = 16, outputs: int = 10):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.w1, self.w2 = nn.Linear(width, width), nn.Linear(width, width)
        self.w3 = nn.Linear(width, width)
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + self.w3(nn.functional.silu(self.w1(h)) * self.w2(h))
        return self.head(h)


class ResidualCNN(nn.Module):
    """A ResNet-style CNN on 1×6×6 images: a tanh stem, one residual block of two 3×3
    convolutions, global average pooling written as ``mean((2, 3))``, a linear head."""

    def __init__(self, channels: int = 4, outputs: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = torch.tanh(h + self.conv2(torch.tanh(self.conv1(h))))
        return self.head(h.mean((2, 3)))


class TinyResNet(nn.Module):
    """A ResNet on 1×6×6 images, BatchNorm in train mode (batch statistics): a stem of
    Conv → BatchNorm → ReLU, one basic block (two 3×3 Conv → BatchNorm, the second added to
    the skip path before the ReLU), global average pooling, a linear head. Convolutions
    before a BatchNorm have no bias, as in ResNets."""

    def __init__(self, channels: int = 4, outputs: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))))
        return self.head(h.mean((2, 3)))


class TinyLM(nn.Module):
    """A language-model head: token and position embeddings, a tanh MLP on the residual stream,
    and an output layer tied to the token embedding. Returns ``(N, vocab, T)`` logits."""

    def __init__(self, vocab: int = 10, width: int = 16, context: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.1)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return nn.functional.linear(h, self.tok.weight).transpose(1, 2)


class TinyTransformer(nn.Module):
    """A pre-LN transformer encoder on sequences of 4 vectors of 6 features: a linear embedding
    to width 8 with a learned position table, one ``nn.TransformerEncoderLayer`` (2 heads, GELU
    MLP of width 16, no dropout), mean over positions, a linear head to 10 classes."""

    def __init__(self, inputs: int = 6, width: int = 8, context: int = 4, outputs: int = 10):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.1)
        self.layer = nn.TransformerEncoderLayer(
            width, 2, 16, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.head = nn.Linear(width, outputs)

    def forward(self, x):
        return self.head(self.layer(self.embed(x) + self.pos[: x.shape[1]]).mean(1))


class GPTBlock(nn.Module):
    """A pre-LN transformer block: causal multi-head self-attention
    (``F.scaled_dot_product_attention``) and a GELU MLP of 4× the width, each on the residual
    stream."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h):
        n, t, width = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(width, dim=-1)
        q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, width))
        return h + self.fc2(nn.functional.gelu(self.fc1(self.ln2(h))))


class GPT(nn.Module):
    """A GPT: token and learned position embeddings, ``layers`` pre-LN blocks, a final
    LayerNorm and an output layer tied to the token embedding (GPT-2's shape with
    ``vocab=50257, width=768, layers=12, heads=12``). Returns ``(N, vocab, T)`` logits, for
    per-token cross-entropy against ``(N, T)`` targets.

    ``gpt2_init``: GPT-2's initialisation (weights and embeddings N(0, 0.02²), the projections
    into the residual stream scaled by 1/√(2·layers), zero biases), without which the tied
    output layer starts with logits of standard deviation ≈ √width; otherwise PyTorch's
    defaults (the Fig. 1 protocol's random networks)."""

    def __init__(
        self,
        vocab: int,
        width: int,
        context: int,
        heads: int,
        layers: int,
        gpt2_init: bool = False,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.1)
        self.blocks = nn.ModuleList(GPTBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        if gpt2_init:
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif p.dim() > 1 or name == "pos":
                    std = (
                        0.02 / (2 * layers) ** 0.5
                        if name.endswith(("proj.weight", "fc2.weight"))
                        else 0.02
                    )
                    nn.init.normal_(p, std=std)

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return nn.functional.linear(self.ln_f(h), self.tok.weight).transpose(1, 2)


def tiny_gpt() -> GPT:
    """A one-block GPT of the Fig. 1 size: 10 tokens, width 8, context 4, 2 heads."""
    return GPT(vocab=10, width=8, context=4, heads=2, layers=1)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 Conv → BatchNorm (ReLU between), added to the input (or to
    its 1×1 Conv → BatchNorm projection when the stride or width changes), then a ReLU."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (CIFAR's variant: a 3×3 stem without max pooling), four
    stages of two basic blocks of 64, 128, 256 and 512 channels, global average pooling and a
    linear head; 11.2M parameters for 3-channel inputs and 10 classes."""

    def __init__(self, classes: int = 10, channels: int = 3, width: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks, inputs = [], width
        for i, outputs in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(inputs, outputs, 2 if i > 0 and j == 0 else 1))
                inputs = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


def _torchvision_models():
    """``torchvision.models`` (the zoo architectures of the Fig. 1 protocol need it)."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError("this architecture is torchvision's: pip install torchvision") from error
    return torchvision.models


def tiny_convnext() -> nn.Module:
    """torchvision's ConvNeXt at width 8 → 16, one block per stage (depthwise 7×7 convolutions,
    LayerNorm on channels-last features, GELU MLPs, layer scale), for 3×8×8 images."""
    models = _torchvision_models()
    from torchvision.models.convnext import CNBlockConfig

    setting = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return models.convnext.ConvNeXt(setting, stochastic_depth_prob=0.0, num_classes=10)


def tiny_efficientnet() -> nn.Module:
    """torchvision's EfficientNet with two MBConv blocks of width 8 (SiLU, squeeze-excite with a
    sigmoid gate, train-mode BatchNorm; no dropout), for 3×8×8 images."""
    models = _torchvision_models()
    from torchvision.models.efficientnet import MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(2, 3, 2, 8, 8, 1)]
    return models.efficientnet.EfficientNet(
        setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=10, last_channel=16
    )


def tiny_swin() -> nn.Module:
    """torchvision's Swin Transformer V1 at embedding width 8, one block per stage, 2×2
    windows (shifted in the second block of a stage), for 3×8×8 images."""
    models = _torchvision_models()
    return models.swin_transformer.SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[2],
        num_heads=[2],
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


class LSTMClassifier(nn.Module):
    """An ``nn.LSTM`` (width 8) over sequences of 4 vectors of 6 features, a linear head on the
    last step."""

    def __init__(self, inputs: int = 6, width: int = 8, outputs: int = 10):
        super().__init__()
        self.lstm, self.head = nn.LSTM(inputs, width, batch_first=True), nn.Linear(width, outputs)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])
