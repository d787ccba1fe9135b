"""The frozen open_clip teacher (docs/method.md §2).

Wraps any open_clip model whose text tower is open_clip's own text transformer: the ``CLIP`` class, or
``CustomTextCLIP`` with a ``TextTransformer``. Provides the image side (global embedding, the LAR local
grid, the patch feature map of the symmetric variant), the text side from token embeddings (so an image
sentence can be spliced in), the tokenizer, and the fingerprint that ties caches and checkpoints to the
exact teacher that made them.

The teacher is frozen: every parameter has ``requires_grad=False`` and ``train()`` keeps it in eval mode.
Gradients still flow *through* the text tower to its inputs (the student's sentence).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import Compose
from torchvision.transforms.functional import normalize

from isa import names
from isa.config import NO_WEIGHTS, ConfigError
from isa.errors import IsaError


class TeacherNotSupportedError(IsaError):
    """The open_clip model has a text tower this project cannot splice into (e.g. a Hugging Face one)."""


@dataclass(frozen=True)
class TextTower:
    """The parts of an open_clip text transformer, whichever model class holds them.

    The modules, parameters and the mask are read from ``holder`` on each use, so they follow the model when
    it moves to another device (``Module.to`` replaces buffers).
    """

    holder: nn.Module  # the module holding the parts: the TextTransformer, or the CLIP model itself
    pool_type: str  # 'argmax' | 'eos' | 'first' | 'last' | 'none'
    eos_id: int | None
    owner: nn.Module | None  # the TextTransformer (for its pad/cls masks), None for the CLIP class

    @property
    def token_embedding(self) -> nn.Embedding:  # (V, w)
        return self.holder.token_embedding

    @property
    def positional_embedding(self) -> nn.Parameter:  # (context, w)
        return self.holder.positional_embedding

    @property
    def transformer(self) -> nn.Module:
        return self.holder.transformer

    @property
    def ln_final(self) -> nn.Module:
        return self.holder.ln_final

    @property
    def text_projection(self) -> nn.Module | nn.Parameter | None:  # (w, D) or Linear
        return self.holder.text_projection

    @property
    def attn_mask(self) -> torch.Tensor | None:  # (context, context) additive causal mask; None = bidirectional
        return self.holder.attn_mask

    @property
    def cls_emb(self) -> torch.Tensor | None:
        return getattr(self.owner, "cls_emb", None)

    @property
    def is_causal(self) -> bool:
        return self.attn_mask is not None

    @property
    def truncatable(self) -> bool:
        """Positions after the pooled EOT cannot change the output (docs/method.md §3, short context)."""
        uses_pad_mask = bool(getattr(self.owner, "use_pad_mask", False))
        return self.is_causal and self.cls_emb is None and not uses_pad_mask and self.pool_type in ("argmax", "eos")

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled position of each sequence, as open_clip's text_global_pool picks it."""
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        raise ValueError(f"pool type {self.pool_type!r} has no single pooled position")


def _text_tower(model: nn.Module) -> TextTower:
    if isinstance(model, open_clip.CustomTextCLIP):
        text = model.text
        if not isinstance(text, open_clip.transformer.TextTransformer):
            raise TeacherNotSupportedError(
                f"teacher text tower {type(text).__name__} is not supported: the image sentence is spliced "
                "into open_clip's own TextTransformer; choose a model whose text_cfg has no hf_model_name"
            )
        return TextTower(text, text.pool_type, text.eos_id, text)
    if type(model) is open_clip.CLIP:
        return TextTower(model, model.text_pool_type, getattr(model, "text_eos_id", None), None)
    raise TeacherNotSupportedError(
        f"teacher model class {type(model).__name__} is not supported; use an open_clip CLIP or CustomTextCLIP model"
    )


class Teacher(nn.Module):
    """A frozen open_clip model: image embeddings, text tower from embeddings, tokenizer, fingerprint.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` whose text tower is open_clip's TextTransformer.
        tokenizer: the model's open_clip tokenizer.
        preprocess: open_clip's inference transform (PIL image -> normalized tensor).
        name: open_clip model name.
        pretrained: the pretrained tag or file it was loaded from ("none" for random init).
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, preprocess: Callable, name: str, pretrained: str):
        super().__init__()
        self.text_tower = _text_tower(model)
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.pretrained = pretrained
        self.preprocess_cfg: dict[str, Any] = dict(getattr(model.visual, "preprocess_cfg", {}))
        self.requires_grad_(False)
        super().train(False)
        self._weights_sha256: str | None = None

    def train(self, mode: bool = True) -> Teacher:
        """The teacher never leaves eval mode (dropout and norms stay as at inference)."""
        return super().train(False)

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def word_dim(self) -> int:
        """w: width of the token embedding table."""
        return self.text_tower.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        """D: width of the joint image-text embedding."""
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        return self.text_tower.positional_embedding.shape[0]

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg.get("size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def token_embeddings(self) -> torch.Tensor:
        """The vocabulary's token embeddings E: (V, w)."""
        return self.text_tower.token_embedding.weight

    @property
    def embed_scale(self) -> float:
        """Mean L2 norm of the teacher's real token embeddings (the size its text tower expects)."""
        return float(self.token_embeddings.detach().float().norm(dim=-1).mean())

    # ---- image side --------------------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``[0, 1]`` images (B, 3, H, W) to the teacher's size and normalize: (B, 3, S, S)."""
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), device=images.device)
        std = torch.tensor(self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD), device=images.device)
        return (images - mean.view(1, 3, 1, 1).to(images.dtype)) / std.view(1, 3, 1, 1).to(images.dtype)

    def preprocess_images(self, images: list[Image.Image]) -> torch.Tensor:
        """open_clip's own inference transform on PIL images: (B, 3, S, S)."""
        return torch.stack([self.preprocess(image) for image in images])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalized global embeddings g of preprocessed pixels (B, 3, S, S): (B, D)."""
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def encode_image_with_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global embedding and projected patch tokens of a ViT image tower.

        Patch tokens are taken after the tower's final norm and projected by its output projection, so
        they live in the joint space of the global embedding.

        Returns:
            ``g`` (B, D), L2-normalized, equal to ``encode_image``; ``tokens`` (B, D, h, w), unnormalized.
        """
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise TeacherNotSupportedError(
                f"local features need an open_clip VisionTransformer image tower without attention pooling; "
                f"teacher {self.name} has {type(visual).__name__} (set cache.local_grid=0 / use an asymmetric student)"
            )
        x = visual._embeds(pixels)  # (B, 1 + h*w, width)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj  # (B, D), (B, h*w, D)
        h, w = pixels.shape[-2] // visual.patch_size[0], pixels.shape[-1] // visual.patch_size[1]
        tokens = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # (B, D, h, w)
        return F.normalize(pooled, dim=-1), tokens

    def encode_image_local(self, pixels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global embedding and the LAR local grid (docs/method.md §4).

        Returns:
            ``g`` (B, D) and ``P`` (B, grid*grid, D): patch tokens average-pooled to ``grid x grid``,
            row-major, each cell L2-normalized.
        """
        g, tokens = self.encode_image_with_tokens(pixels)
        cells = F.adaptive_avg_pool2d(tokens.float(), grid)  # (B, D, g, g)
        local = F.normalize(cells.flatten(2).transpose(1, 2), dim=-1)  # (B, G, D)
        return g, local.to(g.dtype)

    def patch_feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen patch features of ``[0, 1]`` images for the symmetric variant: (B, D, h, w)."""
        with torch.no_grad():
            return self.encode_image_with_tokens(self.prepare(images))[1]

    # ---- text side ---------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """open_clip tokenization to the full context: (B, context) int64."""
        return self.tokenizer(texts)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings of token ids (B, L): open_clip's own ``encode_text``."""
        return F.normalize(self.model.encode_text(ids), dim=-1)

    def encode_text_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run the text tower on given token embeddings, everything after the lookup being the teacher's own.

        Args:
            embeds: token embeddings (B, L, w), possibly with spliced pseudo-words; ``L`` may be shorter
                than the context when the tower is truncatable (see ``TextTower.truncatable``).
            ids: the token ids (B, L) the embeddings stand for (placeholders included): they decide the
                pooled position and padding masks exactly as in open_clip.

        Returns:
            Unnormalized text features (B, D).
        """
        tower = self.text_tower
        x = embeds.to(tower.transformer.get_cast_dtype())
        seq_len = x.shape[1]
        if tower.cls_emb is not None:
            x = torch.cat([x, tower.cls_emb.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
            seq_len += 1
        attn_mask = None if tower.attn_mask is None else tower.attn_mask[:seq_len, :seq_len]
        if tower.owner is not None and (tower.owner.use_pad_mask or tower.cls_emb is not None):
            pad_mask = tower.owner._build_additive_mask(ids, seq_len, x.dtype)  # (B*heads, seq, seq)
            attn_mask = pad_mask if attn_mask is None else attn_mask.unsqueeze(0) + pad_mask
        x = x + tower.positional_embedding[:seq_len].to(x.dtype)
        x = tower.transformer(x, attn_mask=attn_mask)  # (B, seq, w)
        if tower.cls_emb is not None:
            pooled = tower.ln_final(x[:, -1])
        else:
            x = tower.ln_final(x)
            pooled = open_clip.transformer.text_global_pool(x, ids, tower.pool_type, eos_token_id=tower.eos_id)
        if isinstance(tower.text_projection, nn.Linear):
            return tower.text_projection(pooled)
        return pooled if tower.text_projection is None else pooled @ tower.text_projection

    # ---- identity ----------------------------------------------------------------------------------------
    def weights_sha256(self) -> str:
        """sha256 over the teacher's state dict (names, dtypes, shapes and bytes, in name order)."""
        if self._weights_sha256 is None:
            digest = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
            self._weights_sha256 = digest.hexdigest()
        return self._weights_sha256

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this teacher's outputs: model, weights, preprocessing (docs/cache.md)."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256(),
            "embed_dim": self.embed_dim,
            "word_dim": self.word_dim,
            "preprocess": preprocess_section(self.preprocess_cfg, self.image_size),
        }


def preprocess_section(cfg: dict[str, Any], image_size: int = 224) -> dict[str, Any]:
    """A fingerprint's ``preprocess`` section from an open_clip model's ``visual.preprocess_cfg`` (``image_size``:
    the side where the config names none)."""
    size = cfg.get("size", image_size)
    return {
        "size": list(size) if isinstance(size, (tuple, list)) else [size, size],
        "mean": list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }


def expected_preprocess(name: str, pretrained: str = "none") -> dict[str, Any] | None:
    """The ``preprocess`` section :func:`load_teacher` will give the teacher, told in a fraction of a second: the
    model is built on the meta device (no memory, no initialisation, no weights read) with a pretrained tag's own
    preprocessing. A prediction (the loaded teacher's fingerprint is the authority); None where none is made: a
    model that is not one of open_clip's configs (``hf-hub:``, ``local-dir:``) or one it cannot build."""
    register_project_configs()
    if name.startswith(names.SCHEMA_PREFIXES) or open_clip.get_model_config(name) is None:
        return None
    weights = None if pretrained.lower() in NO_WEIGHTS else pretrained
    tag = open_clip.get_pretrained_cfg(name, weights) if weights and not os.path.isfile(weights) else {}
    keys = ("mean", "std", "interpolation", "resize_mode")  # what a tag sets; the side is the model's
    try:
        with random_init(), torch.device("meta"):
            model = open_clip.create_model(
                name, device="meta", force_preprocess_cfg={k: tag[k] for k in keys if k in tag}
            )
    except Exception:  # noqa: BLE001 - no prediction: load_teacher reports why the model cannot be built
        return None
    return preprocess_section(dict(getattr(model.visual, "preprocess_cfg", {})))


def crop_transform(preprocess: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """open_clip's inference transform up to (not including) ToTensor/Normalize: PIL -> resized, cropped PIL.

    Built from a fingerprint's ``preprocess`` section, without loading the model, so CPU decode tasks can
    prepare teacher inputs as compact uint8 crops; :func:`normalize_crops` finishes the transform.
    """
    cfg = open_clip.transform.PreprocessCfg(
        size=tuple(preprocess["size"]),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        interpolation=preprocess["interpolation"],
        resize_mode=preprocess["resize_mode"],
    )
    steps = open_clip.transform.image_transform_v2(cfg, is_train=False).transforms
    names = [type(step).__name__ for step in steps[-2:]]
    if names not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
        raise TeacherNotSupportedError(f"open_clip preprocessing ends with {names}, expected ToTensor, Normalize")
    return Compose(steps[:-2])


def normalize_crops(crops: torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """Finish open_clip's transform on uint8 crops (B, S, S, 3): ToTensor's /255, then Normalize.

    Returns:
        (B, 3, S, S) float32, bit-identical to open_clip's own preprocessing of the same crops.
    """
    pixels = crops.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)  # (B, 3, S, S)
    return normalize(pixels, list(preprocess["mean"]), list(preprocess["std"]))


def register_project_configs() -> None:
    """Make the small open_clip configs shipped in ``isa/model_configs`` known to open_clip."""
    folder = Path(str(resources.files(names.PROJECT_CONFIGS)))
    if folder not in open_clip.factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(folder)


def configured_image_size(name: str) -> int | None:
    """The image side of ``name``'s built-in open_clip config, read without building the model (the loaded model's
    preprocessing is the authority: this is a hint); None for a model without one (``hf-hub:``, ``local-dir:``)."""
    register_project_configs()
    config = open_clip.get_model_config(name) or {}
    size = config.get("vision_cfg", {}).get("image_size")
    return max(size) if isinstance(size, (list, tuple)) else size


def _check_text_config(name: str) -> None:
    config = open_clip.get_model_config(name)
    if config is None:
        if ":" in name:  # hf-hub: / local-dir: schemas are resolved by open_clip itself
            return
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() for the valid names")
    hf_name = config.get("text_cfg", {}).get("hf_model_name")
    if hf_name:
        raise TeacherNotSupportedError(
            f"teacher {name!r} has a Hugging Face text tower ({hf_name}); not supported: the image sentence is "
            "spliced into open_clip's own TextTransformer"
        )


def _check_weights(name: str, weights: str | None) -> None:
    """Refuse weights that are neither a pretrained tag of the model nor a file (offline: open_clip's own list)."""
    if weights is None or name.startswith(names.SCHEMA_PREFIXES) or os.path.isfile(weights):
        return
    if open_clip.get_pretrained_cfg(name, weights):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"teacher.pretrained {weights!r} is neither a pretrained tag of {name} "
        f"({'its tags: ' + ', '.join(tags) if tags else 'it has none'}) nor a weights file; "
        "name one of them, a weights file, or none (random init)"
    )


RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"  # open_clip's warning for a model built without weights


class _NoRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_NOTICE)


@contextlib.contextmanager
def random_init() -> Iterator[None]:
    """Build open_clip models without their warning that no weights were loaded: random init was asked for.

    open_clip logs it through the root logger; only that message is left out, only while the block runs.
    """
    quiet = _NoRandomInitNotice()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def load_teacher(
    name: str,
    pretrained: str = "none",
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int = 0,
) -> Teacher:
    """Create a frozen teacher with open_clip's meaning of ``--teacher NAME --pretrained TAG|FILE|none``.

    Args:
        name: open_clip model name (``open_clip.list_models()``), a project config, or ``hf-hub:``/``local-dir:``.
        pretrained: a pretrained tag of that model, a local weights file (safetensors or a torch file read
            with ``weights_only=True``), or ``"none"`` for random init.
        cache_dir: where open_clip keeps downloads.
        device: where to put the model.
        precision: open_clip precision ("fp32", "bf16", "fp16", "amp", ...).
        seed: random-init seed, so every process builds the same random teacher.

    Raises:
        TeacherNotSupportedError: the model's text tower is not open_clip's own transformer.
    """
    register_project_configs()
    _check_text_config(name)
    weights = None if pretrained.lower() in NO_WEIGHTS else pretrained
    _check_weights(name, weights)
    with torch.random.fork_rng(devices=[]), random_init() if weights is None else contextlib.nullcontext():
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=weights,
            precision=precision,
            device=device,
            cache_dir=cache_dir,
            weights_only=True,
        )
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    return Teacher(model, tokenizer, preprocess, name=name, pretrained=weights or "none")
