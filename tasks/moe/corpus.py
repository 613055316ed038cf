"""The MoE training text: a seeded synthetic English-like corpus, a character tokenizer, batches.

No public-domain corpus is on this machine and nothing may be downloaded, so the text is
generated from a small probabilistic grammar with structure a model can learn at several
ranges:

- within words: a fixed vocabulary, spelled the same way every time;
- within sentences: subject/verb agreement (``the sailor mends`` / ``the sailors mend``,
  ``one fox hides`` / ``three foxes hide``), counting sequences (``two, three, four``,
  ``four, six, eight``) and sums (``two nets and three nets make five nets``);
- within paragraphs: a protagonist whose name fixes the pronoun, and a fact stated at the
  start (``Mara had seven boats.``) that the closing question recalls;
- across paragraphs: each chapter keeps one topic (sea, farm, sky, kitchen, market,
  forest) with its own vocabulary, and chapter numbers count up.

The shipped file ``data/moe-corpus.txt`` is ``generate_corpus(SHIPPED_CHARS, SHIPPED_SEED)``;
regenerate it with ``python -m tasks.moe.corpus data/moe-corpus.txt``.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.errors import InputError

SHIPPED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "moe-corpus.txt"
SHIPPED_CHARS = 1_500_000
SHIPPED_SEED = 0


# --- the grammar -------------------------------------------------------------------------

@dataclass(frozen=True)
class Word:
    """A noun (singular, plural) or a verb (third person singular, base form)."""

    one: str
    many: str


def _words(spec: str, kind: str) -> tuple[Word, ...]:
    """``"boat fish/fish"`` → nouns; ``"mend watch/watches"`` → verbs (irregular forms after ``/``)."""
    out = []
    for item in spec.split():
        first, second = item.split("/") if "/" in item else (item, item + "s")
        # nouns are written singular/plural, verbs base/third-person: 'one' takes the -s form
        out.append(Word(first, second) if kind == "noun" else Word(second, first))
    return tuple(out)


@dataclass(frozen=True)
class Topic:
    """One subject area with its own vocabulary."""

    title: str
    people: tuple[Word, ...]
    things: tuple[Word, ...]
    acts_on: tuple[Word, ...]  # transitive verbs
    acts: tuple[Word, ...]  # intransitive verbs
    adjectives: tuple[str, ...]
    places: tuple[str, ...]


def _topic(title, people, things, acts_on, acts, adjectives, places) -> Topic:
    return Topic(title, _words(people, "noun"), _words(things, "noun"), _words(acts_on, "verb"),
                 _words(acts, "verb"), tuple(adjectives.split()), tuple(places.split()))


TOPICS = (
    _topic("the sea", "sailor captain fisher pilot", "boat net rope sail anchor fish/fish gull shell",
           "mend pull tie watch/watches carry/carries paint clean", "sail rest sing wait",
           "old salty wet long blue quiet", "harbor shore dock lighthouse"),
    _topic("the farm", "farmer shepherd miller child/children", "sheep/sheep cow goat barn field fence apple seed",
           "feed plant count fix/fixes gather water", "work sleep whistle",
           "green muddy tall small warm", "meadow orchard hill well"),
    _topic("the sky", "astronomer student watcher", "star planet moon comet lens telescope chart",
           "observe measure name draw track", "wait think write",
           "bright distant faint cold silver", "tower observatory roof"),
    _topic("the kitchen", "cook baker servant", "loaf/loaves pot knife/knives onion egg bowl spoon pie",
           "bake stir cut wash/washes season", "hum taste",
           "hot fresh sweet heavy clean", "oven pantry table hearth"),
    _topic("the market", "merchant buyer clerk", "coin box/boxes cloth basket scale ribbon",
           "sell buy weigh wrap trade", "argue laugh",
           "cheap rare red fine narrow", "square stall gate bridge"),
    _topic("the forest", "hunter woodcutter ranger", "tree wolf/wolves fox/foxes owl branch/branches log trail",
           "follow cut climb mark hear", "listen hide walk",
           "dark deep mossy wild tall", "clearing river cave grove"),
)
NAMES = {
    "she": ("Mara", "Ada", "Lena", "Ines", "Rosa", "Nell", "Tova"),
    "he": ("Tomas", "Ivo", "Bram", "Emil", "Otto", "Kai", "Leo"),
}
ADVERBS = ("quietly", "slowly", "early", "late", "again", "carefully")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """``42`` → ``"forty-two"``, ``305`` → ``"three hundred and five"`` (0 ≤ n < 1 000 000)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" and {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


def _sentence(rng: random.Random, topic: Topic, name: str, pronoun: str) -> str:
    """One sentence about the paragraph's topic and protagonist (lower-case, no final stop)."""
    person, other = rng.choice(topic.people), rng.choice(topic.people)
    thing, verb, act = rng.choice(topic.things), rng.choice(topic.acts_on), rng.choice(topic.acts)
    adj, place, n = rng.choice(topic.adjectives), rng.choice(topic.places), rng.randint(2, 12)
    kind = rng.randrange(8)
    if kind == 0:
        return f"the {adj} {person.one} {verb.one} the {rng.choice((thing.one, thing.many))}"
    if kind == 1:
        return f"the {person.many} {verb.many} {number_words(n)} {thing.many}"
    if kind == 2:  # agreement decided by the number
        if rng.random() < 0.5:
            return f"one {person.one} {act.one} by the {place}"
        return f"{number_words(n)} {person.many} {act.many} by the {place}"
    if kind == 3:
        return f"{pronoun} {verb.one} the {adj} {thing.one} {rng.choice(ADVERBS)}"
    if kind == 4:  # a counting sequence
        step, start, length = rng.choice((1, 1, 2)), rng.randint(1, 15), rng.randint(3, 6)
        by = " by twos" if step == 2 else ""
        seq = ", ".join(number_words(start + step * i) for i in range(length))
        return f"{name} counted the {thing.many}{by}: {seq}"
    if kind == 5:  # a sum
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        return f"{number_words(a)} {thing.many} and {number_words(b)} {thing.many} make {number_words(a + b)} {thing.many}"
    if kind == 6:
        return f"when the {person.one} {act.one}, the {other.many} {act.many} too"
    return f"{name} {verb.one} the {thing.many} near the {place}, and {pronoun} {act.one} {rng.choice(ADVERBS)}"


def _paragraph(rng: random.Random, topic: Topic) -> str:
    """A protagonist, a fact, a few sentences, and a question that recalls the fact."""
    pronoun = rng.choice(("she", "he"))
    name = rng.choice(NAMES[pronoun])
    person, thing, place, n = rng.choice(topic.people), rng.choice(topic.things), rng.choice(topic.places), rng.randint(2, 12)
    sentences = [f"{name} was a {person.one} who lived near the {place}",
                 f"{name} had {number_words(n)} {thing.many}"]
    sentences += [_sentence(rng, topic, name, pronoun) for _ in range(rng.randint(3, 7))]
    sentences += [f"how many {thing.many} did {name} have?", f"{pronoun} had {number_words(n)} {thing.many}"]
    return " ".join(s[0].upper() + s[1:] + ("" if s.endswith("?") else ".") for s in sentences)


def _chapters(seed: int) -> Iterator[str]:
    """Chapters without end: a numbered heading, then paragraphs on one topic."""
    rng = random.Random(seed)
    number = 0
    while True:
        number += 1
        topic = rng.choice(TOPICS)
        paragraphs = [_paragraph(rng, topic) for _ in range(rng.randint(3, 8))]
        yield f"Chapter {number_words(number)}: {topic.title}.\n\n" + "\n\n".join(paragraphs) + "\n\n"


def generate_corpus(n_chars: int, seed: int = SHIPPED_SEED) -> str:
    """The first ``n_chars`` characters of the synthetic corpus for ``seed``.

    Parameters
    ----------
    n_chars: length of the text returned (the corpus for a seed is one endless text, so a
        shorter corpus is a prefix of a longer one).
    seed: random seed; the same seed gives the same text on every machine.
    """
    if n_chars < 0:
        raise ValueError(f"n_chars must be ≥ 0, got {n_chars!r}")
    pieces, total = [], 0
    for chapter in _chapters(seed):
        if total >= n_chars:
            break
        pieces.append(chapter)
        total += len(chapter)
    return "".join(pieces)[:n_chars]


def write_corpus(path: str | os.PathLike[str], n_chars: int = SHIPPED_CHARS, seed: int = SHIPPED_SEED) -> Path:
    """Generate the corpus and write it as UTF-8 to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate_corpus(n_chars, seed), encoding="utf-8")
    return path


def load_corpus(path: str | os.PathLike[str] = SHIPPED_CORPUS) -> str:
    """The text of a corpus file; a missing, empty or non-UTF-8 file is an InputError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "<file>", str(path), "corpus file not found; generate it with "
                         f"`python -m tasks.moe.corpus {path}`") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, "<file>", exc.object[exc.start:exc.end],
                         f"not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    except OSError as exc:
        raise InputError(path, "<file>", str(path), f"cannot read: {exc}") from None
    if not text:
        raise InputError(path, "<file>", "", "corpus file is empty")
    return text


# --- tokens ------------------------------------------------------------------------------

class Tokenizer:
    """Character-level tokenizer; token ids are the characters' ranks in sorted order.

    Parameters
    ----------
    chars: the vocabulary, as any string holding each character at least once.
    """

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Tokenizer":
        """The tokenizer whose vocabulary is the characters of ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside the vocabulary is a ValueError naming it."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            position = text.index(exc.args[0])
            raise ValueError(f"character {exc.args[0]!r} at position {position} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of token ids."""
        return "".join(self.chars[int(i)] for i in ids)


def tokenize(text: str) -> tuple[Tokenizer, torch.Tensor]:
    """A tokenizer fitted to ``text`` and the text's tokens as a 1-D LongTensor."""
    tokenizer = Tokenizer.from_text(text)
    return tokenizer, torch.tensor(tokenizer.encode(text), dtype=torch.long)


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
            rng: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of ``tokens``: ``x`` (batch_size, seq_len) and ``y``, ``x`` shifted by one.

    Parameters
    ----------
    tokens: 1-D LongTensor of token ids.
    batch_size, seq_len: shape of each batch.
    rng: the torch.Generator that picks the windows (same state, same batches).
    """
    if tokens.dim() != 1 or len(tokens) <= seq_len:
        raise ValueError(f"tokens must be 1-D and longer than seq_len={seq_len}, got shape {tuple(tokens.shape)}")
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=rng)
        windows = tokens[starts[:, None] + offsets]
        yield windows[:, :-1], windows[:, 1:]


def unigram_entropy(tokens: torch.Tensor | Sequence[int]) -> float:
    """Cross-entropy (nats/token) of the best unigram model of ``tokens``: the baseline to beat."""
    counts = torch.bincount(torch.as_tensor(tokens, dtype=torch.long)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic MoE training corpus.")
    parser.add_argument("path", nargs="?", default=str(SHIPPED_CORPUS))
    parser.add_argument("--chars", type=int, default=SHIPPED_CHARS)
    parser.add_argument("--seed", type=int, default=SHIPPED_SEED)
    args = parser.parse_args(argv)
    path = write_corpus(args.path, args.chars, args.seed)
    print(f"wrote {args.chars} characters (seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
