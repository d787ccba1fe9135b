"""The distillation task: frozen teacher, trainable student only, named losses as docs/method.md §4 defines."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from isa.build import build_student, build_task
from isa.config import load_config
from isa.losses import attended_local_features, symmetric_info_nce
from isa.task import parameter_groups


def _task(teacher, *overrides: str):
    config = load_config(
        None, ["student.backbone=mobilenetv3_large_100", "token_learner.dim=64", "token_learner.heads=4", *overrides]
    )
    torch.manual_seed(0)
    student = build_student(config, teacher)
    return build_task(config, teacher, student), config


def _batch(teacher, size: int = 4, grid: int = 2):
    torch.manual_seed(1)
    images = torch.rand(size, 3, 64, 64)
    with torch.no_grad():
        g, local = teacher.encode_image_local(teacher.prepare(images), grid)
    return images, g, local


def test_teacher_gets_no_gradient_and_stays_in_eval_mode(teacher):
    task, _ = _task(teacher)
    task.train()
    assert task.training and task.student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    images, g, local = _batch(teacher)
    task(images, g, local)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in task.trainable_parameters())


def test_only_student_parameters_are_trainable_and_in_the_optimizer(teacher):
    task, config = _task(teacher)
    teacher_ids = {id(p) for p in teacher.parameters()}
    student_ids = {id(p) for p in task.student.parameters()}
    trainable = {id(p) for p in task.trainable_parameters()}
    assert trainable == student_ids | {id(task.logit_scale)} and not trainable & teacher_ids
    groups = parameter_groups(task, config.train.lr, config.train.backbone_lr, config.train.weight_decay, False)
    optimizer = torch.optim.AdamW(groups)
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(trainable)  # each once, teacher never
    decayed = [p for group in groups if group["weight_decay"] > 0 for p in group["params"]]
    assert decayed and all(p.ndim > 1 for p in decayed)
    pretrained = parameter_groups(task, 3e-4, 1e-4, 0.05, pretrained_backbone=True)
    assert {g["name"]: g["lr"] for g in pretrained}["backbone_decay"] == 1e-4
    assert {g["name"]: g["lr"] for g in pretrained}["head_decay"] == 3e-4


def test_losses_match_their_definitions(teacher):
    task, _ = _task(teacher, "loss.lar_tokens_per_image=4", "loss.rel_weight=0.5", "loss.word_weight=0.2")
    task.eval()  # no dropout: the student is deterministic, so the reference can rerun it
    images, g, local = _batch(teacher)
    torch.manual_seed(5)
    losses = task(images, g, local)
    with torch.no_grad():
        out = task.student(images)
        q = task.composer.compose(out.sentence, "a photo of {S}")  # (B, D)
        scale = 1 / 0.07
        gcd = symmetric_info_nce(q, g, scale)
        said = task.composer.encode_words(out.sentence, "a photo of {S}").flatten(0, 1)  # every token, in order
        seen = attended_local_features(out.attention, local)[0].flatten(0, 1)
        lar = symmetric_info_nce(said, seen, 1 / 0.07)
    assert set(losses) == {"loss", "gcd", "lar", "rel", "word", "temperature"}
    torch.testing.assert_close(losses["gcd"], gcd, rtol=0, atol=1e-5)
    torch.testing.assert_close(losses["lar"], lar, rtol=0, atol=1e-5)  # InfoNCE ignores the pair order
    total = losses["gcd"] + 0.3 * losses["lar"] + 0.5 * losses["rel"] + 0.2 * losses["word"]
    torch.testing.assert_close(losses["loss"], total, rtol=0, atol=1e-6)
    assert float(losses["temperature"]) == pytest.approx(0.07)


def test_lar_leaves_out_a_view_that_shows_no_teacher_cell(teacher):
    task, _ = _task(teacher, "loss.lar_tokens_per_image=4")
    task.eval()
    images, g, local = _batch(teacher)  # 4 views, a 2x2 teacher grid
    own = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]])  # the frame itself
    cells = own.expand(4, -1, -1).clone()
    cells[0] += 3.0  # view 0 shows none of the teacher's cells
    with torch.no_grad():
        lar = task(images, g, local, cells)["lar"]
        out = task.student(images)
        said = task.composer.encode_words(out.sentence, "a photo of {S}")[1:].flatten(0, 1)  # views 1-3
        seen = attended_local_features(out.attention, local, cells)[0][1:].flatten(0, 1)
    torch.testing.assert_close(lar, symmetric_info_nce(said, seen, 1 / 0.07), rtol=0, atol=1e-5)


def test_temperature_is_learnable_and_clamped(teacher):
    task, _ = _task(teacher, "loss.min_temperature=0.05", "loss.init_temperature=0.07")
    with torch.no_grad():
        task.logit_scale.fill_(math.log(1 / 0.001))
    assert float(1 / task.current_logit_scale().detach()) == pytest.approx(0.05)
    assert any(p is task.logit_scale for p in task.trainable_parameters())
    frozen, _ = _task(teacher, "loss.learn_temperature=false")
    assert not any(p is frozen.logit_scale for p in frozen.trainable_parameters())


def test_a_few_steps_reduce_the_loss(clip_teacher):
    task, _ = _task(clip_teacher, "loss.lar_weight=0.3")
    images, g, local = _batch(clip_teacher, size=8)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=1e-3)
    task.train()
    first = None
    for _ in range(15):
        loss = task(images, g, local)["loss"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.eval()
    assert float(task(images, g, local)["gcd"]) < first


def test_clear_errors_for_missing_inputs(teacher):
    task, _ = _task(teacher)
    images, g, _ = _batch(teacher)
    with pytest.raises(ValueError, match="teacher_local"):
        task(images, g, None)
    mlp, _ = _task(teacher, "student.mapper=mlp")
    with pytest.raises(ValueError, match="attention maps"):
        mlp(images, g, _batch(teacher)[2])
    no_lar, _ = _task(teacher, "student.mapper=mlp", "loss.lar_weight=0")
    assert set(no_lar(images, g)) == {"loss", "gcd", "temperature"}


def test_symmetric_student_reads_the_frozen_teacher(clip_teacher):
    task, _ = _task(clip_teacher, "student.backbone=symmetric")
    images, g, local = _batch(clip_teacher)
    task(images, g, local)["loss"].backward()
    assert all(p.grad is None for p in clip_teacher.parameters())
    assert not any(n.startswith("teacher") or "visual" in n for n in task.trainable_state_dict())
    assert F.normalize(task.student(images).sentence, dim=-1).shape == (4, 4, clip_teacher.word_dim)


# ops whose CUDA kernels hand a value or a size to the host, which then waits for the device to get there
HOST_READS = {
    "aten._local_scalar_dense",  # .item(), int(), bool()
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.masked_scatter_backward",  # a masked_select of the gradient
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
}


class HostWaits(TorchDispatchMode):
    """Records each op that would make the host wait for a GPU: a host read of a device value, an output whose
    size depends on values (a boolean index too), or a tensor that lives on the host (copied over on each call)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        reads = str(func.overloadpacket) in HOST_READS or str(func) == "aten.repeat_interleave.Tensor"
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        on_host = any(t.device.type == "cpu" and t.ndim > 0 for t in tensors)  # 0-d host scalars go as arguments
        if reads or boolean_index or on_host:
            self.ops.append(f"{func}{' (host tensor)' if on_host else ''}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [(), ("loss.lar_weight=0", "loss.rel_weight=0.5", "loss.word_weight=0.2")])
def test_a_training_step_never_makes_the_host_wait_for_the_device(teacher, overrides):
    """On a GPU the host queues a step's kernels ahead of the device; any op above makes it wait until the queue
    drains, and the GPU then idles while the next kernels are queued. The step (forward, backward, gradient
    clipping) runs on the meta device, which holds no values anywhere, with the teacher moved there after it was
    built (as ``isa train`` moves the task) and every op watched."""
    task, _ = _task(teacher, *overrides)
    images, g, local = _batch(teacher)
    task(images, g, local)  # the prompts are tokenized on the host on first use
    task = copy.deepcopy(task).to("meta")
    inputs = [torch.empty(t.shape, device="meta") for t in (images, g, local)]

    def step() -> None:
        losses = task(*inputs)
        assert losses["loss"].device.type == "meta"
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), 1.0)

    step()  # the first step on a device moves the prompts' ids there, once
    with HostWaits() as waits:
        step()
    assert waits.ops == []
