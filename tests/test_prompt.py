"""Splice exactness and short-context equality (docs/method.md §3) on tiny random teachers, fp32."""

from __future__ import annotations

import pytest
import torch

from isa.prompt import PromptComposer, PromptError, template_parts


def _word_embedding(teacher, word: str) -> torch.Tensor:
    ids = [i for i in teacher.tokenize([word])[0].tolist() if i not in set(teacher.tokenize([""])[0].tolist())]
    assert len(ids) == 1, f"{word!r} must be one token"
    return teacher.token_embeddings[ids[0]]


@pytest.mark.parametrize("short_context", [True, False])
@pytest.mark.parametrize(
    ("template", "fields", "reference"),
    [
        ("a photo of {S}", None, "a photo of dog"),
        (
            "a photo of {S} that {c}",
            {"c": "is red and has long sleeves"},
            "a photo of dog that is red and has long sleeves",
        ),
        ("{S}", None, "dog"),
        ("a photo of {S}, {c}", {"c": "is red"}, "a photo of dog, is red"),  # Pic2Word's: BPE merges "*,"
        ("{S}. {c}?", {"c": "ist rot und hat lange Ärmel"}, "dog. ist rot und hat lange Ärmel?"),
        ("a {domain} of {S}", {"domain": "sketch"}, "a sketch of dog"),  # domain conversion's form
    ],
)
def test_real_word_in_place_of_placeholder_reproduces_encode_text(teacher, short_context, template, fields, reference):
    composer = PromptComposer(teacher, "*", short_context=short_context)
    sentence = _word_embedding(teacher, "dog").view(1, 1, -1)
    with torch.no_grad():
        got = composer.compose(sentence, template, None if fields is None else [fields])
        expected = teacher.encode_text(teacher.tokenize([reference]))
    assert (got - expected).abs().max().item() <= 1e-5


def test_short_context_equals_full_context(teacher):
    torch.manual_seed(0)
    short = PromptComposer(teacher, short_context=True)
    full = PromptComposer(teacher, short_context=False)
    assert short.short_context  # both tiny teachers are causal with argmax pooling
    sentence = torch.randn(3, 4, teacher.word_dim) * teacher.embed_scale / teacher.word_dim**0.5
    texts = [{"c": "is blue"}, {"c": "has a much longer modifier text than the other two prompts"}, {"c": "x"}]
    with torch.no_grad():
        a = short.compose(sentence, "a photo of {S} that {c}", texts)
        b = full.compose(sentence, "a photo of {S} that {c}", texts)
    assert (a - b).abs().max().item() <= 1e-5
    ids = short.prompts("a photo of {S} that {c}", 4, texts).ids
    assert int(teacher.text_tower.pool_positions(ids).max()) + 1 < ids.shape[1]  # really shorter


def test_gradient_reaches_the_sentence_but_not_the_teacher(teacher):
    composer = PromptComposer(teacher)
    sentence = torch.randn(2, 3, teacher.word_dim, requires_grad=True)
    composer.compose(sentence, "a photo of {S}").sum().backward()
    assert sentence.grad is not None and sentence.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_placeholder_positions_and_words(teacher):
    composer = PromptComposer(teacher)
    prompts = composer.prompts("a photo of {S}", 4)
    assert int((prompts.ids == composer.placeholder_id).sum()) == 4
    assert prompts.slots.tolist() == [[4, 5, 6, 7]]  # after the start token and "a photo of"
    assert composer.placeholder_id == teacher.tokenize(["*"])[0, 1].item()  # resolved, not hard-coded
    words = torch.randn(2, 3, teacher.word_dim)
    with torch.no_grad():
        each = composer.encode_words(words, "a photo of {S}")
        one = composer.compose(words[1, 2].view(1, 1, -1), "a photo of {S}")
    assert each.shape == (2, 3, teacher.embed_dim)
    torch.testing.assert_close(each[1, 2], one[0], rtol=0, atol=1e-6)


def test_fashioniq_query_averages_both_caption_orders(teacher):
    composer = PromptComposer(teacher)
    sentence = torch.randn(1, 2, teacher.word_dim)
    template = "a photo of {S} that {c1} and {c2}"
    with torch.no_grad():
        query = composer.fashioniq_query(sentence, template, [("is red", "has long sleeves")])
        ab = composer.compose(sentence, template, [{"c1": "is red", "c2": "has long sleeves"}])
        ba = composer.compose(sentence, template, [{"c1": "has long sleeves", "c2": "is red"}])
    expected = torch.nn.functional.normalize((ab + ba) / 2, dim=-1)
    torch.testing.assert_close(query, expected, rtol=0, atol=1e-6)


def test_prompts_of_several_lengths_in_one_pass_equal_a_pass_each(teacher):
    composer = PromptComposer(teacher)
    torch.manual_seed(0)
    query = torch.randn(3, 4, teacher.word_dim)  # (B, M, w): "a photo of * * * *"
    words = torch.randn(5, 1, teacher.word_dim)  # one word each: a shorter prompt
    edited = torch.randn(2, 2, teacher.word_dim)  # a modifier text per row: the longest prompts
    texts = [{"c": "is blue"}, {"c": "has a much longer modifier than the other prompt of this batch"}]
    parts = [
        composer.fixed_prompts("a photo of {S}", 4, query.device),
        composer.fixed_prompts("a photo of {S}", 1, words.device),
        composer.prompts("a photo of {S} that {c}", 2, texts),
    ]
    assert len({p.needed for p in parts}) == 3
    with torch.no_grad():
        together = composer.encode_prompts([query, words, edited], parts)
        apart = [
            composer.compose(query, "a photo of {S}"),
            composer.compose(words, "a photo of {S}"),
            composer.compose(edited, "a photo of {S} that {c}", texts),
        ]
    for one_pass, own_pass in zip(together, apart):
        torch.testing.assert_close(one_pass, own_pass, rtol=0, atol=1e-5)


def test_errors_are_clear(teacher):
    with pytest.raises(PromptError, match="exactly one token"):
        PromptComposer(teacher, placeholder="photosynthesis-placeholder")
    composer = PromptComposer(teacher)
    prompts = composer.prompts("a photo of {S}", 2)
    with pytest.raises(PromptError, match="2 slots cannot take a sentence of 3"):
        composer.encode_prompts([torch.zeros(1, 3, teacher.word_dim)], [prompts])
    with pytest.raises(PromptError, match="one \\{S\\} field"):
        template_parts("a photo")
    with pytest.raises(PromptError, match="one \\{S\\} field"):
        template_parts("{S} and {S}")
    with pytest.raises(PromptError, match=r"missing \['c'\], unknown \['d'\]"):
        composer.prompts("a photo of {S} that {c}", 2, [{"d": "x"}])
    with pytest.raises(PromptError, match="longer than the text tower's"):
        composer.prompts("{c} {S}", 2, [{"c": "word " * composer.context}])  # the text would push the slots out
    long = composer.prompts("{S} {c}", 2, [{"c": "word " * composer.context}])  # a long text after them is cut
    assert long.slots.tolist() == [[1, 2]] and long.ids.shape[1] == composer.context


# modifier texts that must neither create nor remove a slot, in any script; each keeps its own tokens
TRICKY = [
    "has a * on it",
    "{c} and {S} in braces",
    "*,*, **",
    "is red!?.,",
    "ist rot, mit Ärmeln",
    "赤いドレス",
    "🙂 *",
]


@pytest.mark.parametrize("modifier", TRICKY)
def test_user_text_never_makes_or_breaks_a_slot(teacher, modifier):
    composer = PromptComposer(teacher)
    prompts = composer.prompts("a photo of {S}, {c}", 3, [{"c": modifier}])
    assert prompts.slots.tolist() == [[4, 5, 6]]
    ids = prompts.ids[0].tolist()
    end = teacher.tokenize([""])[0, 1].item()  # the end-of-text token
    row = teacher.tokenize([modifier])[0].tolist()
    own = row[1 : row.index(end)]  # the text tokenized alone
    comma = teacher.tokenize([","])[0, 1].item()
    assert ids[7] == comma and ids[8 : 8 + len(own) + 1] == [*own, end]  # "," then the text's own tokens
    sentence = _word_embedding(teacher, "dog").view(1, 1, -1).expand(1, 3, -1)
    with torch.no_grad():
        got = composer.compose(sentence, "a photo of {S}, {c}", [{"c": modifier}])
        expected = teacher.encode_text(teacher.tokenize([f"a photo of dog dog dog, {modifier}"]))
    assert (got - expected).abs().max().item() <= 1e-5  # the text's "*" keeps its own embedding
