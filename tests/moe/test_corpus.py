"""The synthetic corpus is deterministic, learnable and shipped as generated; bad files are named."""

import math
import re

import pytest
import torch

from infra.errors import InputError
from tasks.moe.corpus import (SHIPPED_CHARS, SHIPPED_CORPUS, SHIPPED_SEED, Tokenizer, batches, generate_corpus,
                              load_corpus, number_words, tokenize, unigram_entropy, write_corpus)

torch.set_num_threads(1)


def test_generation_is_deterministic_for_a_seed_and_differs_between_seeds():
    assert generate_corpus(20_000, seed=3) == generate_corpus(20_000, seed=3)
    assert generate_corpus(20_000, seed=3) != generate_corpus(20_000, seed=4)
    assert len(generate_corpus(12_345, seed=3)) == 12_345


def test_a_shorter_corpus_is_a_prefix_of_a_longer_one():
    assert generate_corpus(50_000, seed=1).startswith(generate_corpus(7_000, seed=1))


def test_shipped_corpus_is_what_its_provenance_command_generates():
    text = load_corpus(SHIPPED_CORPUS)
    assert text == generate_corpus(SHIPPED_CHARS, SHIPPED_SEED)
    assert (SHIPPED_CORPUS.parent / "moe-corpus.PROVENANCE.md").read_text().count(f"--seed {SHIPPED_SEED}")


def test_closing_answer_of_every_paragraph_recalls_the_fact_stated_at_its_start():
    paragraphs = [p for p in generate_corpus(100_000, seed=0).split("\n\n")[:-1] if not p.startswith("Chapter")]
    assert len(paragraphs) > 100
    pronouns = {}
    for paragraph in paragraphs:
        name, count, things = re.match(r"(\w+) was a \w+ who lived near the \w+\. \1 had ([\w -]+) (\w+)\.", paragraph).groups()
        pronoun, answer = re.search(r"How many (\w+) did \w+ have\? (She|He) had ([\w -]+) \1\.$", paragraph).group(2, 3)
        assert answer == count and paragraph.endswith(f"{count} {things}.")
        assert pronouns.setdefault(name, pronoun) == pronoun  # a name always takes the same pronoun


def test_counting_sequences_count_by_ones_or_twos():
    value = {number_words(n): n for n in range(1, 100)}
    sequences = re.findall(r"counted the \w+( by twos)?: ([\w\-, ]+)\.", generate_corpus(100_000, seed=0))
    assert len(sequences) > 50
    for by_twos, seq in sequences:
        numbers = [value[w] for w in seq.split(", ")]
        assert numbers == list(range(numbers[0], numbers[0] + 2 * len(numbers) if by_twos else numbers[0] + len(numbers), 2 if by_twos else 1))


def test_sums_add_up():
    value = {number_words(n): n for n in range(1, 100)}
    sums = re.findall(r"(\w+) (\w+) and (\w+) \2 make ([\w-]+) \2\.", generate_corpus(100_000, seed=0))
    assert len(sums) > 50
    assert all(value[a.lower()] + value[b] == value[total] for a, _, b, total in sums)


def test_number_words():
    assert [number_words(n) for n in (0, 7, 19, 20, 42, 100, 305, 1000, 2024)] == [
        "zero", "seven", "nineteen", "twenty", "forty-two", "one hundred", "three hundred and five",
        "one thousand", "two thousand twenty-four"]


@pytest.mark.parametrize("content, reason", [(None, "not found"), (b"", "empty"), (b"ok \xff\xfe text", "UTF-8")])
def test_load_corpus_errors_name_the_file(tmp_path, content, reason):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_corpus(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_write_then_load_round_trips(tmp_path):
    path = write_corpus(tmp_path / "sub" / "c.txt", n_chars=5_000, seed=9)
    assert load_corpus(path) == generate_corpus(5_000, seed=9)


def test_tokenizer_round_trips_and_names_an_unknown_character():
    text = generate_corpus(5_000, seed=0)
    tokenizer, tokens = tokenize(text)
    assert tokenizer.decode(tokens) == text and tokens.dtype == torch.long
    assert tokenizer.vocab_size == len(set(text)) and int(tokens.max()) == tokenizer.vocab_size - 1
    with pytest.raises(ValueError, match="'#' at position 3"):
        Tokenizer("abc ").encode("ab #")


def test_batches_are_shifted_windows_chosen_by_the_generator():
    tokens = torch.arange(1000)
    x, y = next(batches(tokens, 4, 16, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows of arange
    again, _ = next(batches(tokens, 4, 16, torch.Generator().manual_seed(0)))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="seq_len=16"):
        next(batches(torch.arange(10), 4, 16, torch.Generator()))


def test_unigram_entropy_is_the_entropy_of_token_frequencies():
    assert unigram_entropy(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    assert unigram_entropy([5, 5, 5]) == pytest.approx(0.0)
    assert unigram_entropy([0, 0, 0, 1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
