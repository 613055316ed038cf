"""The models JellyBean profiles and serves, in plain torch with random weights.

The speech-driven VQA workflow has three model operators, each with variants of
different cost and accuracy (the names match the profiles in
``data/jellybean-vqa``):

    ExtractImageFeature  ResNet-18/34/50/101/152 on a 224x224 image -> pooled feature vector
    SpeechRecognition    wav2vec2 base / large-lv60 on 16 kHz audio  -> CTC logits (32 tokens)
    VQA                  MUTAN fusion of image features and transcript tokens -> 2000 answers

Nothing is downloaded: the architectures (layer counts, widths, parameter
counts) are the published ones, the weights are random. That is what latency
and message-size profiling need. The models are serving-only: their forward
passes run under ``torch.inference_mode()`` and carry no dropout.

Entry points: ``VARIANTS``, ``build_variant``, ``example_request``,
``message_bytes`` and ``ctc_greedy_decode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000  # wav2vec2 consumes 16 kHz mono audio
IMAGE_SIZE = 224  # ImageNet resolution
QUESTION_TOKENS = 12  # token ids in one example VQA request


# ---------------------------------------------------------------------------
# ResNet (He et al. 2016; torchvision's v1.5 layout: stride on the 3x3 conv)
# ---------------------------------------------------------------------------


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = conv3x3(in_ch, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, out_ch), nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = conv1x1(in_ch, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv1x1(width, out_ch), nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


RESNET_LAYOUTS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ImageNet ResNet without the classifier: [B, 3, 224, 224] -> pooled features [B, feature_dim]."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch, stages = 64, []
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(in_ch, width, stride if b == 0 else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_ch

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(images))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet(depth: int) -> ResNet:
    """The ImageNet ResNet of the given depth (18, 34, 50, 101 or 152), feature extractor only."""
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"resnet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth!r}")
    block, layers = RESNET_LAYOUTS[depth]
    return ResNet(block, layers)


# ---------------------------------------------------------------------------
# wav2vec2 for CTC (Baevski et al. 2020), as in the -960h fine-tuned checkpoints
# ---------------------------------------------------------------------------

# The CTC vocabulary of the -960h checkpoints: id 0 (<pad>) is the CTC blank, "|" separates words.
CTC_VOCAB = ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L",
             "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")
CTC_BLANK = 0


@dataclass(frozen=True)
class Wav2Vec2Config:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    conv_channels: int = 512
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feature_norm: str = "group"  # "group": GroupNorm on the first conv (base); "layer": after every conv (lv60)
    stable_layer_norm: bool = False  # pre-LN transformer layers (large lv60) instead of post-LN (base)
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    vocab_size: int = len(CTC_VOCAB)
    layer_norm_eps: float = 1e-5


WAV2VEC2_CONFIGS = {
    "wav2vec2-base-960h": Wav2Vec2Config(),
    "wav2vec2-large-960h-lv60-self": Wav2Vec2Config(
        hidden=1024, layers=24, heads=16, ffn=4096,
        conv_bias=True, feature_norm="layer", stable_layer_norm=True,
    ),
}


class FeatureEncoder(nn.Module):
    """Seven strided 1-D convs: raw audio [B, samples] -> frames [B, frames, 512] (one per 20 ms)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        ch = cfg.conv_channels
        self.convs = nn.ModuleList(
            nn.Conv1d(1 if i == 0 else ch, ch, k, stride=s, bias=cfg.conv_bias)
            for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides))
        )
        if cfg.feature_norm == "group":
            self.norms = nn.ModuleList([nn.GroupNorm(ch, ch)])  # first layer only
        else:
            self.norms = nn.ModuleList(nn.LayerNorm(ch, eps=cfg.layer_norm_eps) for _ in self.convs)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave[:, None, :]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.norms):
                norm = self.norms[i]
                x = norm(x) if isinstance(norm, nn.GroupNorm) else norm(x.transpose(1, 2)).transpose(1, 2)
            x = F.gelu(x)
        return x.transpose(1, 2)


class PositionalConv(nn.Module):
    """Relative position information from a wide grouped conv over the frames (replaces sinusoids)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        conv = nn.Conv1d(cfg.hidden, cfg.hidden, cfg.pos_conv_kernel,
                         padding=cfg.pos_conv_kernel // 2, groups=cfg.pos_conv_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if cfg.pos_conv_kernel % 2 == 0 else 0  # an even kernel yields one extra frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.hidden, cfg.hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Transformer layer; post-LN (base) or pre-LN (stable_layer_norm, large lv60)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pre_norm = cfg.stable_layer_norm
        self.attention = SelfAttention(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ffn_in, self.ffn_out = nn.Linear(cfg.hidden, cfg.ffn), nn.Linear(cfg.ffn, cfg.hidden)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(F.gelu(self.ffn_in(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2ForCTC(nn.Module):
    """Raw 16 kHz audio [B, samples] -> CTC logits [B, frames, vocab_size]."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = FeatureEncoder(cfg)
        self.projection_norm = nn.LayerNorm(cfg.conv_channels, eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_channels, cfg.hidden)
        self.pos_conv = PositionalConv(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def frames(self, samples: int) -> int:
        """Number of output frames for an input of `samples` audio samples (49 per second)."""
        for k, s in zip(self.cfg.conv_kernels, self.cfg.conv_strides):
            samples = (samples - k) // s + 1
        return samples

    @torch.inference_mode()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # The -960h feature extractors normalize each utterance to zero mean, unit variance.
        wave = (wave - wave.mean(-1, keepdim=True)) / torch.sqrt(wave.var(-1, keepdim=True) + 1e-7)
        x = self.projection(self.projection_norm(self.feature_encoder(wave)))
        x = x + self.pos_conv(x)
        if not self.cfg.stable_layer_norm:
            x = self.layer_norm(x)
        for layer in self.layers:
            x = layer(x)
        if self.cfg.stable_layer_norm:
            x = self.layer_norm(x)
        return self.lm_head(x)


def wav2vec2(name: str) -> Wav2Vec2ForCTC:
    """The wav2vec2 CTC model of the named checkpoint's architecture (random weights)."""
    if name not in WAV2VEC2_CONFIGS:
        raise ValueError(f"unknown wav2vec2 config {name!r}; known: {', '.join(WAV2VEC2_CONFIGS)}")
    return Wav2Vec2ForCTC(WAV2VEC2_CONFIGS[name])


def ctc_greedy_decode(logits: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decode: argmax per frame, merge repeats, drop blanks. One token-id list per request."""
    transcripts = []
    for best in logits.argmax(-1):
        merged = torch.unique_consecutive(best)
        transcripts.append(merged[merged != CTC_BLANK].tolist())
    return transcripts


def ctc_tokens_to_text(tokens: list[int]) -> str:
    """Token ids of one transcript as text ("|" becomes a space; special tokens dropped)."""
    return "".join(" " if t == 4 else CTC_VOCAB[t] for t in tokens if t >= 4).strip()


def pad_token_ids(transcripts: list[list[int]], length: int | None = None) -> torch.Tensor:
    """Right-pad (with the blank id 0) or truncate transcripts to one [B, length] int64 tensor for the VQA head."""
    length = length if length is not None else max(1, max(map(len, transcripts), default=1))
    ids = torch.full((len(transcripts), length), CTC_BLANK, dtype=torch.long)
    for i, tokens in enumerate(transcripts):
        tokens = tokens[:length]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


# ---------------------------------------------------------------------------
# VQA head: MUTAN Tucker fusion (Ben-younes et al. 2017) of image and question
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAConfig:
    image_dim: int = 512  # width of the image features (512 for resnet18/34, 2048 for resnet50+)
    vocab_size: int = len(CTC_VOCAB)  # the question is the speech transcript's CTC tokens
    embed_dim: int = 128
    question_dim: int = 512  # GRU hidden size
    fusion_dim: int = 310  # both modalities are projected to this width before fusion
    rank: int = 5  # rank of the Tucker core tensor's decomposition
    mm_dim: int = 510  # fused representation width
    answers: int = 2000


class MutanVQA(nn.Module):
    """(image features [B, image_dim], token ids [B, T], right-padded with 0) -> answer logits [B, answers]."""

    def __init__(self, cfg: VQAConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=CTC_BLANK)
        self.gru = nn.GRU(cfg.embed_dim, cfg.question_dim, batch_first=True)
        self.question_proj = nn.Linear(cfg.question_dim, cfg.fusion_dim)
        self.image_proj = nn.Linear(cfg.image_dim, cfg.fusion_dim)
        # Tucker core factorized into `rank` pairs of projections whose products are summed.
        self.question_factors = nn.Linear(cfg.fusion_dim, cfg.rank * cfg.mm_dim)
        self.image_factors = nn.Linear(cfg.fusion_dim, cfg.rank * cfg.mm_dim)
        self.classifier = nn.Linear(cfg.mm_dim, cfg.answers)

    def encode_question(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embedding(tokens))
        last = (tokens != CTC_BLANK).sum(1).clamp(min=1) - 1  # the GRU state after the last real token
        return states[torch.arange(tokens.shape[0]), last]

    @torch.inference_mode()
    def forward(self, image_features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = torch.tanh(self.question_proj(self.encode_question(tokens)))
        v = torch.tanh(self.image_proj(image_features))
        B, R, M = q.shape[0], self.cfg.rank, self.cfg.mm_dim
        fused = (self.question_factors(q).view(B, R, M) * self.image_factors(v).view(B, R, M)).sum(1)
        return self.classifier(torch.tanh(fused))


# ---------------------------------------------------------------------------
# Registry: operator -> variant -> builder, and what one request looks like
# ---------------------------------------------------------------------------

FEATURE_WIDTH = {f"resnet{d}": 512 * block.expansion for d, (block, _) in RESNET_LAYOUTS.items()}


def _vqa(image_variant: str = "resnet18") -> MutanVQA:
    return MutanVQA(VQAConfig(image_dim=_feature_width(image_variant)))


VARIANTS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "ExtractImageFeature": {f"resnet{d}": partial(resnet, d) for d in RESNET_LAYOUTS},
    "SpeechRecognition": {name: partial(wav2vec2, name) for name in WAV2VEC2_CONFIGS},
    "VQA": {"default": _vqa},
}


def _check(operator: str, variant: str) -> None:
    if operator not in VARIANTS:
        raise ValueError(f"unknown operator {operator!r}; known operators: {', '.join(VARIANTS)}")
    if variant not in VARIANTS[operator]:
        raise ValueError(f"unknown variant {variant!r} of operator {operator!r}; "
                         f"known variants: {', '.join(VARIANTS[operator])}")


def _feature_width(image_variant: str) -> int:
    if image_variant not in FEATURE_WIDTH:
        raise ValueError(f"unknown image_variant {image_variant!r}; known image variants: {', '.join(FEATURE_WIDTH)}")
    return FEATURE_WIDTH[image_variant]


def build_variant(operator: str, variant: str, **kw) -> nn.Module:
    """Build one operator variant with random weights, in eval mode.

    Parameters
    ----------
    operator: "ExtractImageFeature", "SpeechRecognition" or "VQA".
    variant: a key of ``VARIANTS[operator]`` (e.g. "resnet50", "wav2vec2-base-960h", "default").
    **kw: passed to the builder; VQA takes ``image_variant`` (default "resnet18") to size its image input.
    """
    _check(operator, variant)
    return VARIANTS[operator][variant](**kw).eval()


def example_request(operator: str, variant: str, batch: int = 1, seconds: float = 2.0, seed: int = 0,
                    image_variant: str = "resnet18") -> tuple[torch.Tensor, ...]:
    """The input tensors of one request batch, to call the built model as ``model(*inputs)``.

    Parameters
    ----------
    operator, variant: as for ``build_variant``.
    batch: requests in the batch.
    seconds: audio length of a SpeechRecognition request (16 kHz samples).
    seed: seed of the random inputs.
    image_variant: for VQA, the image model whose feature width the request carries.
    """
    _check(operator, variant)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    gen = torch.Generator().manual_seed(seed)
    if operator == "ExtractImageFeature":
        return (torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),)
    if operator == "SpeechRecognition":
        samples = round(seconds * SAMPLE_RATE)
        if samples < 400:  # the feature encoder's receptive field is 400 samples (25 ms)
            raise ValueError(f"seconds must be at least 0.025 (one wav2vec2 frame), got {seconds!r}")
        return (torch.randn(batch, samples, generator=gen),)
    features = torch.randn(batch, _feature_width(image_variant), generator=gen)
    tokens = torch.randint(1, len(CTC_VOCAB), (batch, QUESTION_TOKENS), generator=gen)
    return features, tokens


def message_bytes(operator: str, variant: str, output: torch.Tensor) -> int:
    """Bytes one request's output takes on the wire, given the model output for a request batch.

    Features and answer logits travel as float32 tensors; a speech request travels as its greedy CTC
    transcript, int32 token ids. For a batch, the mean per request, rounded up.
    """
    _check(operator, variant)
    batch = output.shape[0]
    if operator == "SpeechRecognition":
        total = 4 * sum(len(t) for t in ctc_greedy_decode(output))
    else:
        total = 4 * output.numel()
    return math.ceil(total / batch)
