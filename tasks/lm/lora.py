"""LoRA adapters on the LM runtime: their files, and many of them applied in one batch.

An adapter adds ``(alpha / r) · B A`` to some of the model's linear layers (PEFT's LoRA: ``A`` is
``[r, in]``, ``B`` is ``[out, r]``). Its file is a PEFT folder — ``adapter_config.json`` and
``adapter_model.safetensors`` — so adapters trained with PEFT on the Hugging Face checkpoint load
as they are, and adapters trained here load in PEFT.

The model fuses q|k|v and gate|up into one matrix each. An adapter's pairs on those modules become
one pair per fused layer: the ``A`` matrices stacked by rows, each ``B`` placed at its module's
output rows and its own columns, so ``(x Aᵀ) Bᵀ`` adds every module's delta exactly.

Many adapters in one forward (Punica's SGMV, S-LoRA's unified pool): the resident adapters sit in
the slots of one :class:`LoraPool` (per layer and fused layer, a fixed rank budget per module); a
batch names each *segment* — a run of consecutive rows with one adapter: a prefill chunk, or
decoding sequences ordered by adapter — and each segment adds its delta with two small matmuls on
views of its slot, while the base matmuls run once for every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.lm.weights import LlamaConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT's module names for a Llama, where each lives in this model, and its place in a fused layer
MODULES = {"q_proj": ("wqkv", 0), "k_proj": ("wqkv", 1), "v_proj": ("wqkv", 2), "o_proj": ("wo", 0),
           "gate_proj": ("w_gate_up", 0), "up_proj": ("w_gate_up", 1), "down_proj": ("w_down", 0)}
FUSED = {"wqkv": ("q_proj", "k_proj", "v_proj"), "wo": ("o_proj",), "w_gate_up": ("gate_proj", "up_proj"),
         "w_down": ("down_proj",)}
PEFT_PREFIX = "base_model.model.model.layers"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message names the file, the field and the value."""


def module_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able module."""
    d, q, kv, f = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.ffn_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def _output_offsets(config: LlamaConfig) -> dict[str, int]:
    """Where each module's outputs start in its fused layer."""
    shapes = module_shapes(config)
    offsets = {}
    for modules in FUSED.values():
        start = 0
        for module in modules:
            offsets[module] = start
            start += shapes[module][1]
    return offsets


@dataclass
class LoraAdapter:
    rank: int
    alpha: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r, in], B [out, r])
    name: str = ""
    base_model: str = ""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({module for _, module in self.weights}, key=list(MODULES).index))

    def delta(self, layer: int, module: str) -> torch.Tensor | None:
        """The module's weight change ``scaling · B A`` [out, in] at ``layer`` (None where it has none)."""
        pair = self.weights.get((layer, module))
        return None if pair is None else self.scaling * pair[1] @ pair[0]

    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


def random_adapter(config: LlamaConfig, rank: int = 8, targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0,
                   std: float = 0.02, name: str = "") -> LoraAdapter:
    """An adapter with random A and B (B non-zero, unlike a fresh PEFT init, so it changes outputs):
    stands in for tenants' adapters when serving is measured at scale."""
    generator = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    weights = {(layer, module): (torch.randn(rank, shapes[module][0], generator=generator) * std,
                                 torch.randn(shapes[module][1], rank, generator=generator) * std)
               for layer in range(config.n_layers) for module in targets}
    return LoraAdapter(rank, float(2 * rank), weights, name=name)


# --- files ------------------------------------------------------------------------------------

def save_adapter(adapter: LoraAdapter, folder: str | Path) -> Path:
    """Write ``adapter`` as a PEFT folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), (a, b) in adapter.weights.items():
        prefix = f"{PEFT_PREFIX}.{layer}.{_block_of(module)}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
              "target_modules": list(adapter.targets), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": adapter.base_model}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def _block_of(module: str) -> str:
    return "self_attn" if MODULES[module][0] in ("wqkv", "wo") else "mlp"


def _parse_key(key: str) -> tuple[int, str, str] | None:
    """(layer, module, "A" | "B") of a PEFT tensor name, or None if it is not one."""
    parts = key.split(".")
    if len(parts) != 9 or ".".join(parts[:4]) != PEFT_PREFIX or not parts[4].isdigit():
        return None
    block, module, which, suffix = parts[5:]
    if module not in MODULES or block != _block_of(module) or which not in ("lora_A", "lora_B") or suffix != "weight":
        return None
    return int(parts[4]), module, which[-1]


def load_adapter(folder: str | Path, config: LlamaConfig, name: str = "") -> LoraAdapter:
    """Read and check a PEFT LoRA folder against ``config``: every problem is an :class:`AdapterError`
    naming the file, the field or tensor, and the value."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path}: missing (an adapter is a PEFT folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type must be LORA (got {meta.get('peft_type')!r})")
    rank, alpha = meta.get("r"), meta.get("lora_alpha", meta.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 256:
        raise AdapterError(f"{config_path}: r must be an integer in 1..256 (got {rank!r})")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterError(f"{config_path}: lora_alpha must be a positive number (got {alpha!r})")
    targets = meta.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or any(t not in MODULES for t in targets):
        raise AdapterError(f"{config_path}: target_modules must list modules of {list(MODULES)} (got {targets!r})")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    shapes = module_shapes(config)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA weight of a Llama layer "
                               f"({PEFT_PREFIX}.<layer>.self_attn|mlp.<module>.lora_A|lora_B.weight)")
        layer, module, which = parsed
        if layer >= config.n_layers:
            raise AdapterError(f"{weights_path}: tensor {key!r}: layer {layer} but the model has {config.n_layers}")
        if module not in targets:
            raise AdapterError(f"{weights_path}: tensor {key!r}: module {module} is not in target_modules {targets}")
        n_in, n_out = shapes[module]
        expected = (rank, n_in) if which == "A" else (n_out, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(f"{weights_path}: tensor {key!r} has shape {list(tensor.shape)}; "
                               f"r={rank} on this model needs {list(expected)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} must hold finite floats (dtype {tensor.dtype})")
        found.setdefault((layer, module), {})[which] = tensor.float()
    if not found:
        raise AdapterError(f"{weights_path}: holds no LoRA weights")
    for (layer, module), pair in found.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"{weights_path}: layer {layer} {module} has no {missing} weight")
    weights = {key: (pair["A"], pair["B"]) for key, pair in sorted(found.items())}
    return LoraAdapter(rank, float(alpha), weights, name=name or folder.name,
                       base_model=str(meta.get("base_model_name_or_path") or ""))


def merge_into(weights: dict[str, torch.Tensor], adapter: LoraAdapter, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Checkpoint weights (names as :func:`tasks.lm.weights.load_checkpoint` gives) with the adapter's
    deltas added: the model a plain single-model server would run for this adapter."""
    names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate",
             "up_proj": "w_up", "down_proj": "w_down"}
    merged = dict(weights)
    for (layer, module) in adapter.weights:
        key = f"layers.{layer}.{names[module]}"
        merged[key] = weights[key].float() + adapter.delta(layer, module)
    return merged


def fused_deltas(adapter: LoraAdapter, config: LlamaConfig) -> dict[tuple[int, str], list[tuple[int, torch.Tensor]]]:
    """The adapter's weight changes on the model's fused layers: (layer, fused layer) -> the
    (first output row, ``scaling · B A``) of each module it adapts there."""
    offsets = _output_offsets(config)
    deltas: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
    for (layer, module) in adapter.weights:
        deltas.setdefault((layer, MODULES[module][0]), []).append((offsets[module], adapter.delta(layer, module)))
    return deltas


# --- many adapters in one batch ---------------------------------------------------------------

@dataclass
class LoraPool:
    """Slots for the resident adapters, per layer and fused layer: ``A`` [slots, modules·rank, in] and
    ``B`` [slots, out, modules·rank]. Module m of a fused layer owns rows (of A) and columns (of B)
    ``m·max_rank ..``; smaller ranks and absent modules stay zero. Slot 0 is never filled: rows
    without an adapter skip the LoRA matmuls."""

    config: LlamaConfig
    n_slots: int
    max_rank: int
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dtype: torch.dtype = torch.float32
    compiled: bool = True  # the compiled kernel (tasks/lm/lora_bgmv.cpp) where it builds
    a: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    b: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        from tasks.lm.kernels import lora_bgmv

        self.kernel = lora_bgmv() if self.compiled and self.dtype == torch.float32 else None
        if self.n_slots < 2:
            raise ValueError(f"a LoRA pool needs at least 2 slots (slot 0 means no adapter); got {self.n_slots}")
        unknown = [t for t in self.targets if t not in MODULES]
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not modules of {list(MODULES)}")
        shapes = module_shapes(self.config)
        for kind, modules in FUSED.items():
            if not any(m in self.targets for m in modules):
                continue
            n_in = shapes[modules[0]][0]
            n_out = sum(shapes[m][1] for m in modules)
            width = len(modules) * self.max_rank
            for layer in range(self.config.n_layers):
                self.a[layer, kind] = torch.zeros(self.n_slots, width, n_in, dtype=self.dtype)
                self.b[layer, kind] = torch.zeros(self.n_slots, n_out, width, dtype=self.dtype)

    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def check(self, adapter: LoraAdapter) -> None:
        """Raise AdapterError if ``adapter`` does not fit this pool (rank, modules)."""
        if adapter.rank > self.max_rank:
            raise AdapterError(f"adapter {adapter.name!r}: r={adapter.rank} exceeds the pool's max rank {self.max_rank}")
        outside = [t for t in adapter.targets if t not in self.targets]
        if outside:
            raise AdapterError(f"adapter {adapter.name!r}: target_modules {outside} are not served "
                               f"(the pool serves {list(self.targets)})")

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy ``adapter`` into ``slot`` (scaling folded into B)."""
        if not 1 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not in 1..{self.n_slots - 1}")
        self.check(adapter)
        offsets, r = _output_offsets(self.config), adapter.rank
        for (layer, kind), a in self.a.items():
            a[slot].zero_()
            self.b[layer, kind][slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            kind, position = MODULES[module]
            rows = slice(position * self.max_rank, position * self.max_rank + r)
            self.a[layer, kind][slot, rows] = a.to(self.dtype)
            self.b[layer, kind][slot, offsets[module]:offsets[module] + b.shape[0], rows] = (adapter.scaling * b).to(self.dtype)

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, kind: str, batch) -> torch.Tensor:
        """``y`` (the base layer's output for input ``x``) plus each row's adapter delta, per the flat
        ``batch``'s segments (``(start, end, slot)``: rows ``start .. end-1`` use the adapter in ``slot``).
        Long segments (a prefill chunk, many decoding rows of one adapter) take two matmuls each; with
        the compiled kernel, every other row goes in one call."""
        if (layer, kind) not in self.a:
            return y
        a, b = self.a[layer, kind], self.b[layer, kind]
        segments = batch.lora_segments
        if self.kernel is not None and y.dtype == torch.float32 and x.dtype == torch.float32:
            if batch.lora_short_row_slots is not None:
                self.kernel(y, x.contiguous(), a, b, batch.lora_short_row_slots)
            segments = batch.lora_long_segments
        for start, end, slot in segments:
            rows = x[start:end].to(self.dtype)
            y[start:end] += ((rows @ a[slot].t()) @ b[slot].t()).to(y.dtype)
        return y


def segments_of(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive rows with the same non-zero slot: ``(start, end, slot)``."""
    runs, start = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start]:
                runs.append((start, i, slots[start]))
            start = i
    return runs
