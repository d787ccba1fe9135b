"""A tiny open_clip teacher aligned on the synthetic world, so the offline quickstart measures something real.

A random-init teacher has no notion of "red" or "circle": composed retrieval with it is noise. Here a
small open_clip model (``isa-world-ViT``, 64 px images) is trained contrastively with open_clip's own
``ClipLoss`` on the world's training images and descriptions of them. The descriptions are drawn from the
image's attributes (a random subset of them, in varied phrasings, always naming at least one), so the text
tower learns each attribute word on its own, much as a web-scale CLIP does. It never sees a triplet or a
modifier text: the composed-retrieval benchmark stays zero-shot.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from isa.data.synthetic import _WHERE, ATTRIBUTES, WORLD_TEACHER
from isa.teacher import random_init, register_project_configs

_PHRASES = {  # attribute -> how a description says it
    "size": "{v}",
    "colour": "{v}",
    "shape": "{v}",
    "position": "{where}",
    "background": "on a {v} background",
    "texture": "on a {v} background",
}


def describe(attributes: Mapping[str, str], rng: random.Random) -> str:
    """A description naming a random non-empty subset of the attributes, e.g. "a photo of a red star"."""
    kept = [name for name in ATTRIBUTES if rng.random() < 0.6] or [rng.choice(ATTRIBUTES)]
    noun = [attributes[n] for n in ("size", "colour") if n in kept]
    noun.append(attributes["shape"] if "shape" in kept else rng.choice(["shape", "object", "thing"]))
    words = ["a", *noun]
    if "position" in kept:
        words.append(_WHERE[attributes["position"]])
    ground = [attributes[n] for n in ("texture", "background") if n in kept]
    if ground:
        words += ["on a", *ground, "background"]
    prefix = rng.choice(["a photo of ", "a picture of ", "an image of ", ""])
    text = prefix + " ".join(words)
    return text.replace(" a a", " an a").replace(" a o", " an o")


def _pixels(paths: Sequence[Path], preprocess) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])  # (N, 3, S, S)


def train_world_teacher(
    image_paths: Sequence[Path],
    attributes: Sequence[Mapping[str, str]],
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> torch.nn.Module:
    """Train ``isa-world-ViT`` from scratch with open_clip's ``ClipLoss``; returns the model in eval mode.

    Args:
        image_paths: the training images (PNG of the world).
        attributes: each image's attributes (``Scene.attributes``).
        steps: optimizer steps; batch_size: image-description pairs per step.
        log_every: print the loss every so many steps (0 = quiet).
    """
    register_project_configs()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    with random_init():
        model, preprocess, _ = open_clip.create_model_and_transforms(WORLD_TEACHER, pretrained=None)
    tokenizer = open_clip.get_tokenizer(WORLD_TEACHER)
    pixels = _pixels(image_paths, preprocess)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        rows = rng.sample(range(len(image_paths)), min(batch_size, len(image_paths)))
        images = _augment(pixels[rows], rng)
        texts = tokenizer([describe(attributes[i], rng) for i in rows])
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"world teacher step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def _augment(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Small random shifts (the world's jitter already varies the rest): (B, 3, S, S)."""
    dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def save_world_teacher(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the weights as safetensors (what ``--pretrained FILE`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def text_to_image_accuracy(model: torch.nn.Module, image_paths: Sequence[Path], captions: Sequence[str]) -> float:
    """Top-1 accuracy of finding each image from its full caption among the given images (a sanity figure)."""
    register_project_configs()
    with random_init():
        _, _, preprocess = open_clip.create_model_and_transforms(WORLD_TEACHER, pretrained=None)
    tokenizer = open_clip.get_tokenizer(WORLD_TEACHER)
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(_pixels(image_paths, preprocess)), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    best = (text @ image.T).argmax(dim=1).numpy()
    return float(np.mean(best == np.arange(len(captions))))
