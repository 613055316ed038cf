"""Specification of the JellyBean models: published architectures, request shapes, wire sizes.

Parameter counts and the large models' shapes are checked on the meta device (no memory, no
compute); forward passes with real numbers run only on the small models and short inputs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tasks.jellybean.models import (
    CTC_BLANK,
    FEATURE_WIDTH,
    VARIANTS,
    build_variant,
    ctc_greedy_decode,
    ctc_tokens_to_text,
    example_request,
    message_bytes,
    pad_token_ids,
)

PROFILE_DIRS = [Path(__file__).resolve().parents[2] / "data" / "jellybean-vqa",
                Path("/work/shared/data/jellybean-vqa")]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(operator: str, variant: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):
        return build_variant(operator, variant, **kw)


@pytest.fixture(scope="module")
def resnet18():
    return build_variant("ExtractImageFeature", "resnet18")


@pytest.fixture(scope="module")
def wav2vec2_base():
    return build_variant("SpeechRecognition", "wav2vec2-base-960h")


# torchvision's resnetN parameter counts minus the 1000-way fc layer (512*1000+1000 or 2048*1000+1000)
@pytest.mark.parametrize("variant, expected", [
    ("resnet18", 11_689_512 - 513_000),
    ("resnet34", 21_797_672 - 513_000),
    ("resnet50", 25_557_032 - 2_049_000),
    ("resnet101", 44_549_160 - 2_049_000),
    ("resnet152", 60_192_808 - 2_049_000),
])
def test_resnet_parameter_counts_match_torchvision_without_fc(variant, expected):
    assert n_params(build_on_meta("ExtractImageFeature", variant)) == expected


@pytest.mark.parametrize("variant, width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                            ("resnet101", 2048), ("resnet152", 2048)])
def test_resnet_emits_pooled_features_of_its_width(variant, width):
    model = build_on_meta("ExtractImageFeature", variant)
    (images,) = example_request("ExtractImageFeature", variant, batch=2)
    assert images.shape == (2, 3, 224, 224)
    assert FEATURE_WIDTH[variant] == model.feature_dim == width
    assert model(images.to("meta")).shape == (2, width)


def test_resnet18_features_are_finite_and_computed_without_autograd(resnet18):
    features = resnet18(*example_request("ExtractImageFeature", "resnet18"))
    assert features.shape == (1, 512)
    assert torch.isfinite(features).all()
    assert torch.is_inference(features) and not features.requires_grad


def test_resnet50_features_are_2048_wide():
    model = build_variant("ExtractImageFeature", "resnet50")
    assert model(*example_request("ExtractImageFeature", "resnet50")).shape == (1, 2048)


# Hugging Face Wav2Vec2ForCTC counts are 94.40M (base) and 315.47M (large), masked_spec_embed included.
@pytest.mark.parametrize("variant, expected", [("wav2vec2-base-960h", 94.40e6),
                                               ("wav2vec2-large-960h-lv60-self", 315.47e6)])
def test_wav2vec2_parameter_counts_match_published_within_3_percent(variant, expected):
    assert n_params(build_on_meta("SpeechRecognition", variant)) == pytest.approx(expected, rel=0.03)


def test_wav2vec2_base_is_post_ln_with_group_norm_on_first_conv_only():
    model = build_on_meta("SpeechRecognition", "wav2vec2-base-960h")
    assert (model.cfg.layers, model.cfg.hidden, model.cfg.heads, model.cfg.ffn) == (12, 768, 12, 3072)
    assert not model.cfg.stable_layer_norm and not model.layers[0].pre_norm
    assert [type(n).__name__ for n in model.feature_encoder.norms] == ["GroupNorm"]
    assert all(conv.bias is None for conv in model.feature_encoder.convs)


def test_wav2vec2_large_lv60_is_pre_ln_with_layer_norm_on_every_conv():
    model = build_on_meta("SpeechRecognition", "wav2vec2-large-960h-lv60-self")
    assert (model.cfg.layers, model.cfg.hidden, model.cfg.heads, model.cfg.ffn) == (24, 1024, 16, 4096)
    assert model.cfg.stable_layer_norm and all(layer.pre_norm for layer in model.layers)
    assert [type(n).__name__ for n in model.feature_encoder.norms] == ["LayerNorm"] * 7
    assert all(conv.bias is not None for conv in model.feature_encoder.convs)


def test_feature_encoder_has_the_wav2vec2_conv_stack():
    convs = build_on_meta("SpeechRecognition", "wav2vec2-base-960h").feature_encoder.convs
    assert [c.kernel_size[0] for c in convs] == [10, 3, 3, 3, 3, 2, 2]
    assert [c.stride[0] for c in convs] == [5, 2, 2, 2, 2, 2, 2]
    assert {c.out_channels for c in convs} == {512}


def test_positional_conv_is_grouped_kernel_128():
    conv = build_on_meta("SpeechRecognition", "wav2vec2-base-960h").pos_conv.conv
    assert (conv.kernel_size[0], conv.groups) == (128, 16)


def test_wav2vec2_base_emits_49_frames_of_32_ctc_logits_per_second(wav2vec2_base):
    (wave,) = example_request("SpeechRecognition", "wav2vec2-base-960h", seconds=1.0)
    assert wave.shape == (1, 16_000)
    logits = wav2vec2_base(wave)
    assert logits.shape == (1, 49, 32) and wav2vec2_base.frames(16_000) == 49
    assert torch.isfinite(logits).all() and torch.is_inference(logits)


def test_wav2vec2_large_emits_49_frames_per_second():
    model = build_on_meta("SpeechRecognition", "wav2vec2-large-960h-lv60-self")
    (wave,) = example_request("SpeechRecognition", "wav2vec2-large-960h-lv60-self", batch=2, seconds=1.0)
    assert model(wave.to("meta")).shape == (2, 49, 32)


def test_example_speech_request_holds_the_requested_seconds_of_16khz_audio():
    (wave,) = example_request("SpeechRecognition", "wav2vec2-base-960h", batch=3, seconds=2.0)
    assert wave.shape == (3, 32_000)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    best_path = torch.tensor([[0, 11, 11, 0, 10, 4, 4, 0, 11, 0, 11]])  # H H _ I | | _ H _ H
    logits = torch.nn.functional.one_hot(best_path, 32).float()
    transcripts = ctc_greedy_decode(logits)
    assert transcripts == [[11, 10, 4, 11, 11]]
    assert ctc_tokens_to_text(transcripts[0]) == "HI HH"


@pytest.mark.parametrize("image_variant, width", [("resnet18", 512), ("resnet50", 2048)])
def test_vqa_scores_2000_answers_from_image_features_and_transcript(image_variant, width):
    model = build_variant("VQA", "default", image_variant=image_variant)
    features, tokens = example_request("VQA", "default", batch=2, image_variant=image_variant)
    assert features.shape == (2, width) and tokens.shape == (2, 12) and tokens.dtype == torch.long
    answers = model(features, tokens)
    assert answers.shape == (2, 2000) and torch.isfinite(answers).all()


def test_vqa_ignores_right_padding_of_the_transcript():
    model = build_variant("VQA", "default")
    features, tokens = example_request("VQA", "default")
    padded = pad_token_ids([tokens[0].tolist()], length=20)
    assert padded[0, 12:].eq(CTC_BLANK).all()
    torch.testing.assert_close(model(features, padded), model(features, tokens))


def test_example_requests_are_reproducible_by_seed():
    a, b, c = (example_request("ExtractImageFeature", "resnet18", seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_message_bytes_are_float32_features_and_int32_transcripts(wav2vec2_base):
    assert message_bytes("ExtractImageFeature", "resnet18", torch.zeros(1, 512)) == 2048
    assert message_bytes("ExtractImageFeature", "resnet50", torch.zeros(4, 2048)) == 8192
    assert message_bytes("VQA", "default", torch.zeros(1, 2000)) == 8000
    logits = wav2vec2_base(*example_request("SpeechRecognition", "wav2vec2-base-960h", seconds=1.0))
    transcript = ctc_greedy_decode(logits)[0]
    assert message_bytes("SpeechRecognition", "wav2vec2-base-960h", logits) == 4 * len(transcript)


def test_unknown_operator_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown operator 'OCR'.*ExtractImageFeature, SpeechRecognition, VQA"):
        build_variant("OCR", "default")


def test_unknown_variant_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown variant 'resnet200' of operator 'ExtractImageFeature'.*resnet18"):
        build_variant("ExtractImageFeature", "resnet200")
    with pytest.raises(ValueError, match=r"unknown variant 'whisper'.*wav2vec2-base-960h"):
        example_request("SpeechRecognition", "whisper")
    with pytest.raises(ValueError, match=r"unknown image_variant 'vit'.*resnet152"):
        build_variant("VQA", "default", image_variant="vit")


def test_built_models_are_in_eval_mode():
    assert not build_on_meta("ExtractImageFeature", "resnet18").training


def test_registry_covers_every_profiled_operator_variant():
    profile_dir = next((d for d in PROFILE_DIRS if (d / "execution_profile.csv").exists()), None)
    if profile_dir is None:
        pytest.skip("jellybean-vqa execution profile not found")
    with open(profile_dir / "execution_profile.csv", newline="") as f:
        profiled = {(row[0], row[2]) for row in csv.reader(f) if row}
    registered = {(op, v) for op, variants in VARIANTS.items() for v in variants}
    assert profiled == registered
