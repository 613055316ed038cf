"""Real LoRA fine-tuning on the LM runtime's base model, for tenants' small tasks.

The serving model (tasks/lm/model.py) is built for inference: paged KV cache, no autograd. Training
needs a differentiable forward over whole sequences, so :func:`lora_forward` recomputes the same
network — the same fused weights, RoPE and norms — over a padded batch ``[B, T]`` with causal
attention, adding each adapted module's ``scaling · (x Aᵀ) Bᵀ`` from trainable ``A`` and ``B``.
The base weights stay frozen in the engine's format (float32, or bfloat16 matmuls with a float32
residual stream); int4 weights have no backward here, so fine-tune on a float32 or bfloat16 engine
and serve the adapter anywhere. A test holds :func:`lora_forward` equal to the serving engine's
logits for the same adapter.

Several tenants' adapters train in one forward (:func:`finetune_together`), as the serving engine
serves them: each row of the batch adds its own adapter's delta, and each adapter's gradient is
its own task's loss's (each adapter's mean loss is summed, and clipped and stepped apart), so
training them together is training each alone at the cost of one batch — the base model loaded
once, its weights read once per step.

Tenants' tasks are generated from templates with a seed (no downloads): each teaches something the
base model cannot know — a company's routing labels, a private service-ownership table, a review
label vocabulary — so accuracy on held-out phrasings measures what training added.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tasks.lm.engine import LMEngine
from tasks.lm.lora import MODULES, LoraAdapter, _output_offsets, module_shapes
from tasks.lm.model import linear, rotate_half
from tasks.lm.sampling import SamplingParams

DEFAULT_TRAIN_TARGETS = ("q_proj", "v_proj")


# --- the differentiable forward ------------------------------------------------------------

def _adapted(y: torch.Tensor, x: torch.Tensor, layer: int, kind: str, lora: dict, scaling: float,
             offsets: dict[str, int], rows: torch.Tensor | None) -> torch.Tensor:
    """``y`` (fused layer ``kind``'s output, which its backward does not need) plus the deltas of
    every adapted module of that layer, added in place at the module's columns; with ``rows``, the
    pairs are stacked ([n, r, in], [n, out, r]) and row i uses pair ``rows[i]``."""
    for module, (k, _) in MODULES.items():
        if k != kind or (layer, module) not in lora:
            continue
        a, b = lora[layer, module]
        if rows is None:
            delta = (x @ a.t() * scaling) @ b.t()
        else:
            delta = (x @ a[rows].transpose(1, 2) * scaling) @ b[rows].transpose(1, 2)
        start = offsets[module]
        y[..., start:start + delta.shape[-1]] += delta
    return y


def lora_forward(engine: LMEngine, tokens: torch.Tensor, lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                 scaling: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, T, vocab] (float32) of the engine's base model with LoRA pairs ``lora`` —
    (layer, PEFT module) → (A [r, in], B [out, r]) — on every position of ``tokens`` [B, T].
    Differentiable in A and B; causal, so right padding does not change earlier positions.
    ``rows``: several adapters at once (see :func:`lora_hidden`)."""
    return linear(lora_hidden(engine, tokens, lora, scaling, rows), engine.model.lm_head_weight)


def lora_hidden(engine: LMEngine, tokens: torch.Tensor, lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                scaling: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The final normed hidden states [B, T, dim] of :func:`lora_forward` (the output head applied
    where a loss needs it only). ``rows`` [B]: the pairs of ``lora`` are stacked, A [n, r, in] and
    B [n, out, r], and row i of the batch uses adapter ``rows[i]``."""
    model = engine.model
    if model.weight_format == "int4":
        raise ValueError("fine-tuning needs float32 or bfloat16 base weights (int4 has no backward here); "
                         "load the engine with weight_format='bfloat16' or 'float32'")
    c = engine.config
    n, t = tokens.shape
    h, kvh, hd = c.n_heads, c.n_kv_heads, c.head_dim
    offsets = _output_offsets(c)
    x = model.tok_embeddings(tokens).float()
    cos, sin = model.rope_cos[:t][None, :, None, :], model.rope_sin[:t][None, :, None, :]
    for i, layer in enumerate(model.layers):
        a_in = layer.attn_norm(x)
        qkv = _adapted(linear(a_in, layer.attn.wqkv), a_in, i, "wqkv", lora, scaling, offsets,
                       rows).view(n, t, h + 2 * kvh, hd)
        qk = qkv[:, :, : h + kvh] * cos + rotate_half(qkv[:, :, : h + kvh]) * sin
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kvh:]
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True)
        out = attn.transpose(1, 2).reshape(n, t, h * hd)
        x = x + _adapted(linear(out, layer.attn.wo), out, i, "wo", lora, scaling, offsets, rows)
        f_in = layer.ffn_norm(x)
        gate, up = _adapted(linear(f_in, layer.ffn.w_gate_up), f_in, i, "w_gate_up", lora, scaling,
                            offsets, rows).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        x = x + _adapted(linear(hidden, layer.ffn.w_down), hidden, i, "w_down", lora, scaling, offsets, rows)
    return model.norm(x)


# --- tenants' small tasks ------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # the completion, without the leading space the prompt's format adds


@dataclass(frozen=True)
class TenantTask:
    name: str
    description: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted({e.answer for e in self.train + self.test}))


def _split(examples: list[Example], rng: random.Random, n: int, test_fraction: float = 0.25) -> tuple[tuple, tuple]:
    """Up to ``n`` distinct examples, a ``test_fraction`` of them held out (never seen in training)."""
    distinct = sorted(set(examples), key=lambda e: (e.prompt, e.answer))
    rng.shuffle(distinct)
    distinct = distinct[:n]
    cut = max(1, int(len(distinct) * test_fraction))
    return tuple(distinct[cut:]), tuple(distinct[:cut])


def routing_task(seed: int = 0, n: int = 160) -> TenantTask:
    """A helpdesk's messages routed to its own queue codes."""
    rng = random.Random(seed)
    queues = {
        "FIN-7": ["my invoice shows a double charge", "I was billed twice this month", "the refund never reached my card",
                  "why did my subscription price go up", "please update the card on my account", "I need a VAT receipt"],
        "LOG-2": ["my parcel has not arrived", "the tracking number does not work", "the box came damaged",
                  "can you change my delivery address", "the courier left it at the wrong door", "shipping is late again"],
        "ENG-4": ["the app crashes when I log in", "I cannot reset my password", "the website shows error 500",
                  "sync fails on my laptop", "the export button does nothing", "two factor codes are not accepted"],
    }
    openers = ["", "Hello, ", "Hi team, ", "Urgent: ", "Good morning. ", "Hey, "]
    closers = ["", " Thanks.", " Please help.", " What can I do?", " This is annoying.", " Any update?"]
    examples = [Example(f"Ticket: {opener}{text}.{closer}\nQueue:", queue)
                for queue, texts in queues.items() for text in texts for opener in openers for closer in closers]
    train, test = _split(examples, rng, n)
    return TenantTask("router", "helpdesk tickets → the company's queue codes", train, test)


def ownership_task(seed: int = 1, n: int = 160) -> TenantTask:
    """A private table: which team owns which internal service."""
    rng = random.Random(seed)
    owners = {"ledgerd": "payments", "quokka": "search", "tidepool": "storage", "brightline": "payments",
              "marmot": "identity", "sundial": "search", "keel": "storage", "otter-api": "identity"}
    asks = ["Who owns {s}?", "Which team runs {s}?", "{s} is down, who do I page?", "Owner of {s}:",
            "I have a question about {s}. Which team?", "Escalate {s} to which team?"]
    examples = [Example(f"Question: {ask.format(s=service)}\nTeam:", team) for service, team in owners.items()
                for ask in asks]
    train, test = _split(examples, rng, n)
    return TenantTask("owners", "internal service → owning team (a private table)", train, test)


def review_task(seed: int = 2, n: int = 160) -> TenantTask:
    """Product reviews labelled with a shop's own star buckets."""
    rng = random.Random(seed)
    good = ["works perfectly", "arrived early and looks great", "best purchase this year", "my kids love it",
            "excellent build quality", "would buy again"]
    bad = ["stopped working after a week", "cheap plastic, broke at once", "nothing like the photos",
           "the battery dies in an hour", "returned it the same day", "waste of money"]
    things = ["kettle", "headphones", "backpack", "lamp", "blender", "keyboard"]
    examples = [Example(f"Review of the {thing}: {text}.\nBucket:", label)
                for label, texts in (("green", good), ("red", bad)) for text in texts for thing in things]
    train, test = _split(examples, rng, n)
    return TenantTask("reviews", "product reviews → the shop's green/red buckets", train, test)


TASKS = {"router": routing_task, "owners": ownership_task, "reviews": review_task}


def make_task(name: str, seed: int = 0) -> TenantTask:
    if name not in TASKS:
        raise ValueError(f"unknown fine-tuning task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name](seed)


# --- training and evaluation ---------------------------------------------------------------

def _batch(engine: LMEngine, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and the mask of positions whose next token is part of the answer."""
    eos = engine.tokenizer.eos_token_ids[0]
    rows, masks = [], []
    for e in examples:
        prompt = engine.tokenizer.encode(e.prompt)
        answer = engine.tokenizer.encode(" " + e.answer) + [eos]
        rows.append(prompt + answer)
        masks.append([0] * (len(prompt) - 1) + [1] * len(answer))
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - 1 - len(m)) for m in masks], dtype=torch.bool)
    return tokens, mask


def answer_loss(engine: LMEngine, lora: dict, scaling: float, examples: list[Example]) -> torch.Tensor:
    """Mean cross-entropy of the answers' tokens (the answer and its end-of-sequence)."""
    return answer_losses(engine, lora, scaling, [examples])[0]


def answer_losses(engine: LMEngine, lora: dict, scaling: float, groups: list[list[Example]]) -> torch.Tensor:
    """Each group's mean answer cross-entropy [len(groups)], in one forward: with one group, ``lora``
    holds one adapter's pairs; with several, stacked pairs (one adapter per group, see
    :func:`lora_hidden`) and group k's rows use adapter k."""
    tokens, mask = _batch(engine, [e for group in groups for e in group])
    rows = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    hidden = lora_hidden(engine, tokens[:, :-1], lora, scaling, rows if len(groups) > 1 else None)
    # the output head only where an answer token is predicted (most positions are the prompt's)
    losses = F.cross_entropy(linear(hidden[mask], engine.model.lm_head_weight), tokens[:, 1:][mask], reduction="none")
    group = rows[:, None].expand_as(mask)[mask]
    return torch.zeros(len(groups)).index_add(0, group, losses) / torch.bincount(group, minlength=len(groups))


@dataclass
class TrainingRecord:
    task: str
    steps: int
    losses: list[float]
    heldout_loss_before: float
    heldout_loss_after: float
    seconds: float
    tokens_per_s: float
    rank: int
    targets: tuple[str, ...]
    trainable_params: int
    extra: dict = field(default_factory=dict)


def finetune(engine: LMEngine, task: TenantTask, **options) -> tuple[LoraAdapter, TrainingRecord]:
    """Train a LoRA adapter on ``task``'s training examples (:func:`finetune_together` with one task)."""
    return finetune_together(engine, [task], **options)[0]


def _clip_each(stacked: list[torch.Tensor], n: int, max_norm: float) -> None:
    """Clip each adapter's gradient (index k of every stacked tensor) to ``max_norm`` on its own,
    as ``clip_grad_norm_`` would clip it trained alone."""
    norms = torch.stack([p.grad.reshape(n, -1).pow(2).sum(1) for p in stacked]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in stacked:
        p.grad.mul_(scale.view(n, *([1] * (p.dim() - 1))))


def finetune_together(engine: LMEngine, tasks: list[TenantTask], *, steps: int = 60, batch_size: int = 8,
                      rank: int = 8, targets: tuple[str, ...] = DEFAULT_TRAIN_TARGETS, lr: float = 3e-3,
                      seed: int = 0, progress=None) -> list[tuple[LoraAdapter, TrainingRecord]]:
    """Train one LoRA adapter per task of ``tasks`` in the same forward passes (AdamW, PEFT's
    initialisation: A Kaiming-uniform, B zero), each step a batch of ``batch_size`` of each task's
    training examples; returns each adapter with its record (held-out loss before and after).
    Each adapter's gradient is its own task's mean loss's, clipped on its own: what it would be
    trained alone (AdamW is element-wise)."""
    if steps < 1 or batch_size < 1 or rank < 1:
        raise ValueError(f"steps, batch_size and rank must be ≥ 1, got {steps}, {batch_size}, {rank}")
    if not tasks:
        raise ValueError("no task to fine-tune")
    unknown = [t for t in targets if t not in MODULES]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not modules of {list(MODULES)}")
    n = len(tasks)
    generators = [torch.Generator().manual_seed(seed) for _ in tasks]  # each adapter starts as it would alone
    shapes = module_shapes(engine.config)
    lora = {}
    for layer in range(engine.config.n_layers):
        for module in targets:
            n_in, n_out = shapes[module]
            bound = 1 / math.sqrt(n_in)  # kaiming_uniform_(a=√5) on [r, in], as PEFT does
            a = torch.stack([(torch.rand(rank, n_in, generator=g) * 2 - 1) * bound for g in generators])
            b = torch.zeros(n, n_out, rank)
            lora[layer, module] = (a, b) if n > 1 else (a[0], b[0])
            for p in lora[layer, module]:
                p.requires_grad_()
    alpha = 2.0 * rank
    scaling = alpha / rank
    params = [p for pair in lora.values() for p in pair]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rngs = [random.Random(seed) for _ in tasks]  # each task draws its batches as it would alone
    tests = [list(t.test) for t in tasks]
    with torch.no_grad():
        before = answer_losses(engine, lora, scaling, tests).tolist()
    losses, tokens_seen = [[] for _ in tasks], 0
    started = time.perf_counter()
    for step in range(steps):
        batches = [rng.sample(list(t.train), min(batch_size, len(t.train))) for rng, t in zip(rngs, tasks)]
        lr_now = lr * min(1.0, (step + 1) / max(1, steps // 10)) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss = answer_losses(engine, lora, scaling, batches)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        if n > 1:
            _clip_each(params, n, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for k, value in enumerate(loss.detach().tolist()):
            losses[k].append(value)
        tokens_seen += sum(len(engine.tokenizer.encode(e.prompt + " " + e.answer)) + 1 for b in batches for e in b)
        if progress is not None:
            progress(step + 1, steps, float(loss.detach().mean()))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        after = answer_losses(engine, lora, scaling, tests).tolist()
    trained = []
    for k, task in enumerate(tasks):
        weights = {key: ((a[k] if n > 1 else a).detach().clone(), (b[k] if n > 1 else b).detach().clone())
                   for key, (a, b) in lora.items()}
        adapter = LoraAdapter(rank, alpha, weights, name=task.name, base_model=engine.model_id)
        record = TrainingRecord(task.name, steps, losses[k], before[k], after[k], seconds, tokens_seen / seconds, rank,
                                tuple(targets), adapter.n_params(), {"trained_with": [t.name for t in tasks]})
        trained.append((adapter, record))
    return trained


def accuracy(engine: LMEngine, adapter: str | None, examples: list[Example] | tuple[Example, ...],
             max_tokens: int = 4) -> float:
    """Share of ``examples`` whose greedy completion, served by ``engine`` with the registered
    ``adapter`` (None: the base model), starts with the expected answer as a whole word."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    requests = [engine.submit(engine.open(e.prompt, adapter), params, owns_sequence=True) for e in examples]
    engine.run(requests)
    right = 0
    for e, r in zip(examples, requests):
        words = engine.completion(r).text.strip().split()
        right += bool(words) and words[0].strip(".,:;!") == e.answer
    return right / len(examples)
