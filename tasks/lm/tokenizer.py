"""The model's tokenizer and chat template, built from the checkpoint's own metadata.

A GGUF file carries its vocabulary: a byte-level BPE (``tokenizer.ggml.model = gpt2``) is assembled
from its merges with the pre-tokenizer ``tokenizer.ggml.pre`` names, a SentencePiece BPE (``llama``)
from its pieces and their scores. A safetensors folder carries a ``tokenizer.json``. The chat
template (Jinja2) comes from the checkpoint too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tasks.lm.weights import ModelLoadError

_CONTROL = 3  # llama.cpp token type of control tokens (<|im_start|> …)
# the pre-tokenizers llama.cpp names in tokenizer.ggml.pre: the steps before the byte-level one,
# which applies GPT-2's regex
_PRE_TOKENIZERS = {
    "default": [],
    "gpt2": [],
    "smollm": [pre_tokenizers.Digits(individual_digits=True)],
    "starcoder": [pre_tokenizers.Digits(individual_digits=True)],
    "refact": [pre_tokenizers.Digits(individual_digits=True)],
}


@dataclass
class ChatTokenizer:
    """Encode/decode text and render chat messages with the model's template."""

    tokenizer: Tokenizer
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos and self.bos_token_id >= 0 else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a list of ``{"role", "content"}`` messages."""
        if not self.chat_template:
            # no template shipped: a plain transcript the model can continue
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id) if self.bos_token_id >= 0 else "",
                eos_token=self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else "",
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"the model's chat template failed on these messages: {exc}") from exc

    @cached_property
    def _template(self) -> jinja2.Template:
        """The chat template, compiled once (the server renders it for every chat request)."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        return env.from_string(self.chat_template)


def _raise_exception(message):
    raise ValueError(message)


def build_tokenizer(meta: dict) -> ChatTokenizer:
    """The tokenizer of a checkpoint loaded by :func:`tasks.lm.weights.load_checkpoint`."""
    info = meta["tokenizer"]
    eos = info.get("eos_token_id", -1)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if int(e) >= 0)
    if meta["format"] == "gguf":
        tokenizer = _from_gguf(meta["path"], info)
        types = list(info.get("token_type") or [])
        control = [info["tokens"][i] for i, kind in enumerate(types) if kind == _CONTROL]
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    else:
        if not info.get("tokenizer_json"):
            raise ModelLoadError(f"{meta['path']}: no tokenizer.json next to the weights")
        tokenizer = Tokenizer.from_file(info["tokenizer_json"])
    return ChatTokenizer(
        tokenizer=tokenizer, bos_token_id=int(info.get("bos_token_id") if info.get("bos_token_id") is not None else -1),
        eos_token_ids=eos_ids, add_bos=bool(info.get("add_bos_token")), chat_template=info.get("chat_template") or "",
    )


def _from_gguf(path: str, info: dict) -> Tokenizer:
    if info["model"] == "llama":
        return _sentencepiece_from_gguf(path, info)
    if info["model"] != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer.ggml.model is {info['model']!r}; supported: 'gpt2' (byte-level BPE) "
                             "and 'llama' (SentencePiece BPE)")
    if info["pre"] not in _PRE_TOKENIZERS:
        raise ModelLoadError(f"{path}: tokenizer.ggml.pre is {info['pre']!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(info["tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in info["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = [*_PRE_TOKENIZERS[info["pre"]], pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_from_gguf(path: str, info: dict) -> Tokenizer:
    """SentencePiece BPE (Llama 2, TinyLlama, …): "▁" for spaces and one in front of the text,
    unknown characters as <0xXX> byte tokens, merges in the order of the merged pieces' scores."""
    tokens, scores = list(info["tokens"]), list(info.get("scores") or [])
    if len(scores) != len(tokens):
        raise ModelLoadError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in info.get("merges") or []] or _merges_by_score(vocab, scores)
    unk = info.get("unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk] if unk is not None and unk >= 0 else None,
                                     fuse_unk=True, byte_fallback=True))
    prefix = bool(info.get("add_space_prefix", True))
    # a normalizer, not Metaspace: SentencePiece adds its "▁" even before text that starts with a space
    tokenizer.normalizer = normalizers.Sequence([*([normalizers.Prepend("\u2581")] if prefix else []),
                                                 normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tokenizer


def _merges_by_score(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a piece into two pieces,
    best-scored merged piece first (SentencePiece merges the pair whose result scores highest)."""
    merges = []
    for piece, index in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[index], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
