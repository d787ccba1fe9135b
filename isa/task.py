"""The distillation task: student + frozen teacher + losses, one forward returning named losses.

``DistillTask.forward`` returns ``{"loss": total, "gcd": ..., "lar": ..., "rel": ..., "word": ...,
"temperature": τ}`` so logging is one call. Only the student and the temperature are trainable: the
teacher stays frozen and in eval mode whatever ``train()`` is called on the task, and it is never part of
:meth:`DistillTask.trainable_parameters` (so never in the optimizer, and never wrapped in DDP by callers,
who wrap ``task.student`` only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from isa.losses import Gather, GCDLoss, attended_local_features, relational_kl, symmetric_info_nce, word_manifold
from isa.prompt import PromptComposer, Prompts
from isa.teacher import Teacher


@dataclass(frozen=True)
class LossWeights:
    """Weights and temperatures of the objective (plain values built from ``LossConfig``)."""

    lar: float = 0.3  # λ
    rel: float = 0.0  # β
    word: float = 0.0  # γ
    init_temperature: float = 0.07  # τ at step 0
    learn_temperature: bool = True
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    lar_temperature: float = 0.07
    lar_tokens_per_image: int = 1
    rel_teacher_temperature: float = 0.07


class DistillTask(nn.Module):
    """``L = L_GCD + λ·L_LAR + β·L_rel + γ·L_word`` (docs/method.md §4).

    Args:
        student: maps ``[0, 1]`` images (B, 3, H, W) to a StudentOutput (sentence (B, M, w), attention).
        teacher: the frozen teacher.
        composer: prompt composer over the same teacher.
        weights: loss weights and temperatures.
        train_template: the training prompt, ``"a photo of {S}"``.
        rank, world_size: this worker's place in the global batch.
        gather: all-gather with autograd; defaults to torch.distributed's.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Teacher,
        composer: PromptComposer,
        weights: LossWeights = LossWeights(),
        train_template: str = "a photo of {S}",
        rank: int = 0,
        world_size: int = 1,
        gather: Gather | None = None,
    ):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.composer = composer
        self.weights = weights
        self.train_template = train_template
        self.gcd = GCDLoss(rank, world_size, gather)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1 / weights.init_temperature)), requires_grad=weights.learn_temperature
        )

    def train(self, mode: bool = True) -> DistillTask:
        super().train(mode)
        self.teacher.train(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters and the temperature; never the teacher's."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        return params + ([self.logit_scale] if self.logit_scale.requires_grad else [])

    @property
    def student_module(self) -> nn.Module:
        """The student itself, also when a caller has wrapped it (e.g. in DDP)."""
        return getattr(self.student, "module", self.student)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: ``student.*`` and ``logit_scale``."""
        state = {f"student.{k}": v for k, v in self.student_module.state_dict().items()}
        state["logit_scale"] = self.logit_scale.detach()
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        student = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
        self.student_module.load_state_dict(student)
        with torch.no_grad():
            self.logit_scale.copy_(state["logit_scale"])

    def _logit_scale_bounds(self) -> tuple[float, float]:
        """log(1/τ) for τ at max_temperature and at min_temperature."""
        return math.log(1 / self.weights.max_temperature), math.log(1 / self.weights.min_temperature)

    def current_logit_scale(self) -> torch.Tensor:
        """1/τ with τ clamped to [min_temperature, max_temperature]."""
        return self.logit_scale.clamp(*self._logit_scale_bounds()).exp()

    def clamp_temperature_(self) -> None:
        """Bring the learned temperature back into [min_temperature, max_temperature], after each optimizer step
        (as open_clip clamps its logit scale). Past a bound the clamped forward passes no gradient, so the raw
        parameter would otherwise stay stuck wherever the step left it."""
        with torch.no_grad():
            self.logit_scale.clamp_(*self._logit_scale_bounds())

    def query(self, sentence: torch.Tensor) -> torch.Tensor:
        """q = normalize(text_tower(train_prompt(S))): (B, D)."""
        return self.composer.compose(sentence, self.train_template)

    def forward(
        self,
        images: torch.Tensor,
        teacher_emb: torch.Tensor,
        teacher_local: torch.Tensor | None = None,
        cells: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named losses of one local batch.

        Args:
            images: (B, 3, H, W) student views in [0, 1].
            teacher_emb: (B, D) cached L2-normalized teacher embeddings g.
            teacher_local: (B, G, D) cached teacher local grid; required when λ > 0.
            cells: (B, G, 4) where each teacher cell lies in each view (:func:`isa.augment.teacher_cells_in_view`);
                None: every view is the teacher's own frame.
        """
        out = self.student(images)
        sentence = out.sentence  # (B, M, w)
        target = teacher_emb.float()  # caches may hold float16
        scale = self.current_logit_scale()
        if self.weights.lar > 0:  # the query prompts and LAR's one-word prompts in one text-tower pass
            words, maps = self._lar_words(sentence, out.attention, teacher_local)  # (B, k, w), (B, k, h, w)
            query, said = self.composer.encode_prompts(
                [sentence, words.flatten(0, 1)[:, None]],
                [self._prompts(sentence.shape[1], sentence.device), self._prompts(1, sentence.device)],
            )  # (B, D), (B*k, D)
        else:
            query, said = self.query(sentence), None
        query = query.float()
        losses = {"gcd": self.gcd(query, target, scale)}
        total = losses["gcd"]
        if said is not None:
            seen, share = attended_local_features(maps, teacher_local, cells)  # (B, k, D), (B, k)
            seen = seen.to(said.dtype).flatten(0, 1)  # (B*k, D)
            valid = share.flatten() > 0  # a view that shows none of the teacher's cells has nothing to align
            losses["lar"] = symmetric_info_nce(said, seen, 1 / self.weights.lar_temperature, valid)
            total = total + self.weights.lar * losses["lar"]
        if self.weights.rel > 0:
            all_target = self.gcd.gather(target) if self.gcd.world_size > 1 else target
            losses["rel"] = relational_kl(query, target, all_target, scale, self.weights.rel_teacher_temperature)
            total = total + self.weights.rel * losses["rel"]
        if self.weights.word > 0:
            losses["word"] = word_manifold(sentence, self.teacher.token_embeddings)
            total = total + self.weights.word * losses["word"]
        losses["loss"] = total
        losses["temperature"] = (1 / scale).detach()
        return losses

    def _prompts(self, num_tokens: int, device: torch.device) -> Prompts:
        return self.composer.fixed_prompts(self.train_template, num_tokens, device)

    def _lar_words(
        self, sentence: torch.Tensor, attention: torch.Tensor | None, local: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LAR's chosen words of each sentence and their attention maps: (B, k, w), (B, k, h, w)."""
        if attention is None:
            raise ValueError(
                "LAR needs a student with attention maps (the ATL); set loss.lar_weight=0 for this student"
            )
        if local is None:
            raise ValueError(
                "LAR needs teacher_local features in the cache; embed with cache.local_grid>0 or set loss.lar_weight=0"
            )
        batch, tokens = sentence.shape[:2]
        k = min(self.weights.lar_tokens_per_image, tokens)
        chosen = torch.rand(batch, tokens, device=sentence.device).argsort(dim=1)[:, :k]  # (B, k)
        words = torch.gather(sentence, 1, chosen[..., None].expand(-1, -1, sentence.shape[-1]))  # (B, k, w)
        maps = attention.gather(1, chosen[..., None, None].expand(-1, -1, *attention.shape[2:]))  # (B, k, h, w)
        return words, maps


def parameter_groups(
    task: DistillTask, lr: float, backbone_lr: float, weight_decay: float, pretrained_backbone: bool
) -> list[dict]:
    """AdamW groups: backbone at ``backbone_lr`` when pretrained (else ``lr``); no decay on 1-d params.

    Only trainable parameters appear: the teacher is never in the optimizer.
    """
    groups_by_role = task.student_module.parameter_groups()
    groups = []
    for role, params in groups_by_role.items():
        role_lr = backbone_lr if role == "backbone" and pretrained_backbone else lr
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        groups += [
            {"name": f"{role}_decay", "params": decay, "lr": role_lr, "weight_decay": weight_decay},
            {"name": f"{role}_no_decay", "params": no_decay, "lr": role_lr, "weight_decay": 0.0},
        ]
    if task.logit_scale.requires_grad:
        groups.append({"name": "temperature", "params": [task.logit_scale], "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
