"""Prompt composition: splice the image sentence into a prompt for the frozen text tower (docs/method.md §3).

A template such as ``"a photo of {S} that {c}"`` becomes token ids piece by piece: the literal text and the
modifier text ``{c}`` tokenized each on its own, and for ``{S}`` ``M`` slots holding one placeholder word's id
(resolved through the teacher's tokenizer, never hard-coded). The slots' positions are known from the assembly,
never searched for, and receive the sentence ``S (B, M, w)`` in place of their token embeddings, before
positional embeddings are added. Everything after that is the teacher's own text tower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from isa.errors import IsaError
from isa.teacher import Teacher

SENTENCE_FIELD = "{S}"


@dataclass(frozen=True)
class Prompts:
    """Tokenized prompts ready for the text tower on one device (see :meth:`PromptComposer.prompts`)."""

    ids: torch.Tensor  # (B or 1, context) token ids
    slots: torch.Tensor  # (B or 1, M) the placeholders' positions in each row, ascending
    needed: int  # positions the tower must run: up to the last pooled one (short context), else the context

    def to(self, device: torch.device) -> Prompts:
        return Prompts(self.ids.to(device), self.slots.to(device), self.needed)


class PromptError(IsaError):
    """A template, placeholder or modifier text cannot be composed into a prompt."""


FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")  # a template's fields: {S}, {c}, {c1} ...


def template_parts(template: str) -> list[tuple[str, str]]:
    """A template as its pieces in order: ``("text", literal)``, ``("sentence", "S")`` or ``("field", name)``.

    Raises:
        PromptError: no ``{S}``, or more than one.
    """
    parts: list[tuple[str, str]] = []
    at = 0
    for match in FIELD.finditer(template):
        parts.append(("text", template[at : match.start()]))
        name = match.group(1)
        parts.append(("sentence", name) if "{" + name + "}" == SENTENCE_FIELD else ("field", name))
        at = match.end()
    parts.append(("text", template[at:]))
    sentences = sum(kind == "sentence" for kind, _ in parts)
    if sentences != 1:
        raise PromptError(f"template {template!r} must hold one {SENTENCE_FIELD} field for the image sentence")
    return parts


class PromptComposer:
    """Composes prompts with spliced image sentences and encodes them with the teacher's text tower.

    A prompt's token ids are assembled piece by piece: each literal piece of the template and each field's text
    is tokenized on its own, and the sentence's ``M`` slots are placed between them by position. So the slots
    never depend on how the tokenizer treats the characters next to them (BPE would merge ``*,`` into one
    token), and no text can create or remove a slot, whatever it holds (``*``, braces, any language).

    Args:
        teacher: the frozen teacher whose tokenizer and text tower are used.
        placeholder: a word the tokenizer maps to exactly one token; its id fills the slots (their embeddings
            are replaced by the sentence's).
        short_context: run only as many positions as the longest prompt needs (causal towers with
            EOT/EOS pooling only; the result is the same as with the full context).
    """

    def __init__(self, teacher: Teacher, placeholder: str = "*", short_context: bool = True):
        self.teacher = teacher
        self.placeholder = placeholder
        self.prefix, self.suffix, self.pad = self._frame()
        self.context = int(teacher.tokenize([""]).shape[1])  # positions of the text tower
        self.placeholder_id = self._resolve_placeholder(placeholder)
        self.short_context = short_context and teacher.text_tower.truncatable
        self._fixed: dict[tuple[str, int], Prompts] = {}  # on the host
        self._fixed_on: dict[tuple[str, int, torch.device], Prompts] = {}  # the same, moved to a device

    def _frame(self) -> tuple[list[int], list[int], int]:
        """The ids the tokenizer puts before and after every text (CLIP: start and end of text) and its padding."""
        empty, word = (row.tolist() for row in self.teacher.tokenize(["", "a"]))
        pad = empty[-1]
        frame = empty[: max(i for i, token in enumerate(empty) if token != pad) + 1]
        common = 0
        while common < len(frame) and frame[common] == word[common]:
            common += 1
        prefix, suffix = frame[:common], frame[common:]
        if not suffix or suffix[-1] == pad:
            raise PromptError(f"the tokenizer of teacher {self.teacher.name} ends a text with no token of its own")
        return prefix, suffix, pad

    def _pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's own token ids, without the frame (any frame token inside a text is left out)."""
        if not texts:
            return []
        frame = set(self.prefix) | set(self.suffix)
        pieces = []
        for row in self.teacher.tokenize(list(texts)).tolist():
            end = max(i for i, token in enumerate(row) if token != self.pad) + 1 - len(self.suffix)
            pieces.append([token for token in row[len(self.prefix) : end] if token not in frame])
        return pieces

    def _resolve_placeholder(self, word: str) -> int:
        (ids,) = self._pieces([word])
        if len(ids) != 1:
            raise PromptError(
                f"placeholder {word!r} is {len(ids)} tokens for teacher {self.teacher.name}; choose a word "
                "that is exactly one token (prompt.placeholder)"
            )
        return ids[0]

    def prompts(self, template: str, num_tokens: int, texts: Sequence[dict[str, str]] | None = None) -> Prompts:
        """Token ids of the filled prompts (on the host), each with ``num_tokens`` slots for the sentence.

        Args:
            template: a template with one ``{S}`` and optionally other fields.
            num_tokens: M, the sentence length.
            texts: one mapping of field values per prompt; None for a template without other fields (the
                prompt is made once and reused).

        Raises:
            PromptError: a field without a value or a value without its field, or a prompt so long that the
                sentence would be cut at the context length.
        """
        if texts is None:
            key = (template, num_tokens)
            if key not in self._fixed:
                self._fixed[key] = self._assemble(template, num_tokens, [{}])
            return self._fixed[key]
        return self._assemble(template, num_tokens, texts)

    def _assemble(self, template: str, num_tokens: int, texts: Sequence[dict[str, str]]) -> Prompts:
        parts = template_parts(template)
        fields = [name for kind, name in parts if kind == "field"]
        for values in texts:
            if set(values) != set(fields):
                missing, extra = sorted(set(fields) - set(values)), sorted(set(values) - set(fields))
                raise PromptError(f"template {template!r} has fields {fields}: missing {missing}, unknown {extra}")
        literals = self._pieces([text for kind, text in parts if kind == "text"])
        values = iter(self._pieces([row[name] for row in texts for name in fields]))
        context = self.context
        room = context - len(self.prefix) - len(self.suffix)
        rows, slots = [], []
        for _ in texts:
            body: list[int] = []
            literal = iter(literals)
            for kind, _name in parts:
                if kind == "text":
                    body += next(literal)
                elif kind == "field":
                    body += next(values)
                else:
                    start = len(body)
                    body += [self.placeholder_id] * num_tokens
                    slots.append(list(range(len(self.prefix) + start, len(self.prefix) + start + num_tokens)))
            if slots[-1] and len(self.prefix) + room <= slots[-1][-1]:
                raise PromptError(
                    f"a prompt of template {template!r} is longer than the text tower's {context} positions before "
                    "the end of the image sentence: shorten its text"
                )
            row = self.prefix + body[:room] + self.suffix
            rows.append(row + [self.pad] * (context - len(row)))
        ids = torch.tensor(rows, dtype=torch.long)  # (B, context)
        needed = int(self.teacher.text_tower.pool_positions(ids).max()) + 1 if self.short_context else context
        return Prompts(ids, torch.tensor(slots, dtype=torch.long).view(len(rows), num_tokens), needed)

    def fixed_prompts(self, template: str, num_tokens: int, device: torch.device) -> Prompts:
        """:meth:`prompts` of a template without other fields on ``device``, made once per template, M and device
        (no copy from the host per call)."""
        key = (template, num_tokens, torch.device(device))
        if key not in self._fixed_on:
            self._fixed_on[key] = self.prompts(template, num_tokens).to(device)
        return self._fixed_on[key]

    def encode_prompts(self, sentences: Sequence[torch.Tensor], prompts: Sequence[Prompts]) -> list[torch.Tensor]:
        """Several sentences, each spliced into its prompts, through one pass of the text tower.

        The prompts are cut to the longest one's needed positions, so every prompt's output is what a pass of its
        own gives (a causal tower never looks past a prompt's pooled position).

        Args:
            sentences: (B_i, M_i, w) each.
            prompts: for each sentence, its prompts on the sentences' device: B_i rows, or one row for all,
                with M_i placeholders each.

        Returns:
            L2-normalized text embeddings, (B_i, D) each.
        """
        for sentence, p in zip(sentences, prompts):
            if p.slots.shape[1] != sentence.shape[1]:
                raise PromptError(
                    f"prompts with {p.slots.shape[1]} slots cannot take a sentence of {sentence.shape[1]}"
                )
        length = max(p.needed for p in prompts)
        sizes = [s.shape[0] for s in sentences]
        ids = torch.cat([p.ids[:, :length].expand(n, -1) for p, n in zip(prompts, sizes)])  # (N, L)
        embeds = self.teacher.text_tower.token_embedding(ids).flatten(0, 1)  # (N*L, w)
        # each word's row in the flattened embeddings; row-major, as the words are flattened
        rows, first = [], 0
        for p, n in zip(prompts, sizes):
            prompt_rows = torch.arange(first, first + n, device=ids.device)[:, None]  # (n, 1)
            rows.append((prompt_rows * length + p.slots.expand(n, -1)).flatten())  # (n*M_i,)
            first += n
        words = torch.cat([s.reshape(-1, s.shape[-1]) for s in sentences])  # (sum n*M_i, w)
        embeds = embeds.index_copy(0, torch.cat(rows), words.to(embeds.dtype)).view(len(ids), length, -1)
        encoded = F.normalize(self.teacher.encode_text_embeddings(embeds, ids), dim=-1)  # (N, D)
        return list(encoded.split(sizes))

    def compose(
        self, sentence: torch.Tensor, template: str, texts: Sequence[dict[str, str]] | None = None
    ) -> torch.Tensor:
        """The sentence spliced into the template's prompts (one per ``texts`` row) and encoded: (B, D), normalized."""
        if texts is None:
            prompts = self.fixed_prompts(template, sentence.shape[1], sentence.device)
        else:
            prompts = self.prompts(template, sentence.shape[1], texts).to(sentence.device)
        return self.encode_prompts([sentence], [prompts])[0]

    def encode_words(self, sentence: torch.Tensor, template: str) -> torch.Tensor:
        """Each word of each sentence alone in a template (LAR's ``a photo of {s_im}``).

        Args:
            sentence: (B, K, w).

        Returns:
            (B, K, D) L2-normalized.
        """
        batch, words, width = sentence.shape
        flat = self.compose(sentence.reshape(batch * words, 1, width), template)  # (B*K, D)
        return flat.view(batch, words, -1)

    def fashioniq_query(
        self, sentence: torch.Tensor, template: str, captions: Sequence[tuple[str, str]]
    ) -> torch.Tensor:
        """FashionIQ query: both caption orders, mean of the two normalized embeddings, normalized: (B, D)."""
        forward = self.compose(sentence, template, [{"c1": a, "c2": b} for a, b in captions])
        backward = self.compose(sentence, template, [{"c1": b, "c2": a} for a, b in captions])
        return F.normalize(forward + backward, dim=-1)
