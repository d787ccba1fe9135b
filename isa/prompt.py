"""Prompt composition: splice the image sentence into a prompt for the frozen text tower (docs/method.md §3).

A template such as ``"a photo of {S} that {c}"`` is filled with the modifier text ``{c}`` and, for
``{S}``, ``M`` copies of one placeholder word. The placeholder's token id is resolved through the
teacher's tokenizer (never hard-coded); its ``M`` positions in the tokenized prompt receive the sentence
``S (B, M, w)`` in place of their token embeddings, before positional embeddings are added. Everything
after that is the teacher's own text tower.
"""

from __future__ import annotations

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


def fill_template(template: str, sentence_words: str, **fields: str) -> str:
    """Replace ``{S}`` and named fields (``{c}``, ``{c1}``, ``{c2}`` ...) without ``str.format``.

    User text may hold braces, so only the known fields are replaced, each exactly once.
    """
    if SENTENCE_FIELD not in template:
        raise PromptError(f"template {template!r} has no {SENTENCE_FIELD} field for the image sentence")
    text = template.replace(SENTENCE_FIELD, sentence_words)
    for name, value in fields.items():
        field = "{" + name + "}"
        if field not in template:
            raise PromptError(f"template {template!r} has no {field} field")
        text = text.replace(field, value)
    return text


class PromptComposer:
    """Composes prompts with spliced image sentences and encodes them with the teacher's text tower.

    Args:
        teacher: the frozen teacher whose tokenizer and text tower are used.
        placeholder: a word the tokenizer maps to exactly one token.
        short_context: run only as many positions as the longest prompt needs (causal towers with
            EOT/EOS pooling only; the result is the same as with the full context).
    """

    def __init__(self, teacher: Teacher, placeholder: str = "*", short_context: bool = True):
        self.teacher = teacher
        self.placeholder = placeholder
        self.placeholder_id = self._resolve_placeholder(placeholder)
        self.short_context = short_context and teacher.text_tower.truncatable
        self._fixed: dict[tuple[str, int], Prompts] = {}  # on the host
        self._fixed_on: dict[tuple[str, int, torch.device], Prompts] = {}  # the same, moved to a device

    def _resolve_placeholder(self, word: str) -> int:
        special = set(self.teacher.tokenize([""])[0].tolist())
        ids = [i for i in self.teacher.tokenize([word])[0].tolist() if i not in special]
        if len(ids) != 1:
            raise PromptError(
                f"placeholder {word!r} is {len(ids)} tokens for teacher {self.teacher.name}; choose a word "
                "that is exactly one token (prompt.placeholder)"
            )
        return ids[0]

    def tokenize(self, template: str, num_tokens: int, texts: Sequence[dict[str, str]] | None = None) -> torch.Tensor:
        """Token ids of filled prompts, each holding exactly ``num_tokens`` placeholders: (B, context).

        Args:
            template: a template with ``{S}`` and optionally other fields.
            num_tokens: M, the sentence length.
            texts: one mapping of field values per prompt; None for a template without other fields
                (the ids are then computed once and reused).
        """
        if texts is None:
            return self._host_prompts(template, num_tokens).ids
        words = " ".join([self.placeholder] * num_tokens)
        return self._checked_ids([fill_template(template, words, **fields) for fields in texts], num_tokens)

    def _host_prompts(self, template: str, num_tokens: int) -> Prompts:
        """:meth:`prompts` of a template without other fields, made once per template and M."""
        key = (template, num_tokens)
        if key not in self._fixed:
            words = " ".join([self.placeholder] * num_tokens)
            self._fixed[key] = self.prompts(self._checked_ids([fill_template(template, words)], num_tokens), num_tokens)
        return self._fixed[key]

    def _checked_ids(self, prompts: list[str], num_tokens: int) -> torch.Tensor:
        ids = self.teacher.tokenize(prompts)
        counts = (ids == self.placeholder_id).sum(dim=1)
        bad = (counts != num_tokens).nonzero().flatten().tolist()
        if bad:
            first = prompts[bad[0]]
            raise PromptError(
                f"prompt {first!r} holds {int(counts[bad[0]])} placeholder tokens instead of {num_tokens}: the "
                f"text contains the placeholder word {self.placeholder!r} or was cut at the context length"
            )
        return ids

    def prompts(self, ids: torch.Tensor, num_tokens: int) -> Prompts:
        """Host ids with their placeholders' positions and the positions the tower must run.

        Everything that reads the ids' values is done here, on the host, so that composing on a GPU never
        waits for the device: no host read of a device value, no output whose size depends on values.
        """
        ids = ids.cpu()
        rows, slots = (ids == self.placeholder_id).nonzero(as_tuple=True)
        if not torch.equal(rows.bincount(minlength=ids.shape[0]), torch.full((ids.shape[0],), num_tokens)):
            raise PromptError(f"every prompt must hold exactly {num_tokens} placeholder tokens {self.placeholder!r}")
        needed = int(self.teacher.text_tower.pool_positions(ids).max()) + 1 if self.short_context else ids.shape[1]
        return Prompts(ids, slots.view(ids.shape[0], num_tokens), needed)

    def fixed_prompts(self, template: str, num_tokens: int, device: torch.device) -> Prompts:
        """:meth:`prompts` of a template without other fields on ``device``, made once per template, M and device
        (no copy from the host per call)."""
        key = (template, num_tokens, torch.device(device))
        if key not in self._fixed_on:
            self._fixed_on[key] = self._host_prompts(template, num_tokens).to(device)
        return self._fixed_on[key]

    def encode(self, sentence: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Splice the sentence into the prompts and run the text tower.

        Args:
            sentence: (B, M, w) pseudo-word embeddings.
            ids: (B, context) or (1, context) token ids from :meth:`tokenize` with M placeholders per row.

        Returns:
            L2-normalized text embeddings (B, D).
        """
        return self.encode_prompts([sentence], [self.prompts(ids, sentence.shape[1]).to(sentence.device)])[0]

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
        """``encode(sentence, tokenize(template, M, texts))``: L2-normalized (B, D)."""
        if texts is None:
            prompts = self.fixed_prompts(template, sentence.shape[1], sentence.device)
            return self.encode_prompts([sentence], [prompts])[0]
        return self.encode(sentence, self.tokenize(template, sentence.shape[1], texts))

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
