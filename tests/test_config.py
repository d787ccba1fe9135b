from __future__ import annotations

import dataclasses

import pytest

from isa.config import Config, ConfigError, flatten, from_dict, load_config, to_dict


def test_defaults_follow_the_method():
    config = Config()
    assert config.teacher.name == "ViT-L-14" and config.teacher.pretrained == "openai"
    assert config.student.backbone == "efficientnet_b0"
    assert config.token_learner.num_tokens == 4 and config.token_learner.dim == 512
    assert config.token_learner.depth == 2 and config.token_learner.heads == 8
    assert config.loss.lar_weight == 0.3 and config.loss.rel_weight == 0 and config.loss.word_weight == 0
    assert config.train.global_batch_size == 512 and config.train.weight_decay == 0.05
    assert config.prompt.train_template == "a photo of {S}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0  # type: ignore[misc]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  epochs: 3\nteacher:\n  name: ViT-B-32\n")
    config = load_config(
        path,
        [
            "train.epochs=5",
            "teacher.pretrained=none",
            "eval.distractor_counts=1000,10000",
            "eval.distractors=s3://bucket/distractors",
            "train.tracking_uri=null",
            "train.use_gpu=true",
            "loss.lar_weight=0",
        ],
    )
    assert config.train.lr == 1e-3 and config.train.epochs == 5
    assert config.teacher.name == "ViT-B-32" and config.teacher.pretrained == "none"
    assert config.eval.distractor_counts == (1000, 10000)
    assert config.train.tracking_uri is None and config.train.use_gpu is True
    assert config.loss.lar_weight == 0.0 and isinstance(config.loss.lar_weight, float)


def test_a_file_and_its_overrides_are_checked_together(tmp_path):
    """A file naming a project teacher (no pretrained tags) holds once an override gives its weights, as the
    quickstart's settings file does; the same file alone is refused, naming the key."""
    path = tmp_path / "world.yaml"
    path.write_text("teacher:\n  name: isa-world-ViT\n")
    config = load_config(path, ["teacher.pretrained=none"])
    assert (config.teacher.name, config.teacher.pretrained) == ("isa-world-ViT", "none")
    with pytest.raises(ConfigError, match="'teacher.pretrained': 'openai': isa-world-ViT is a project model config"):
        load_config(path)


def test_round_trip_through_plain_dicts():
    config = load_config(
        None, ["eval.distractor_counts=10,20", "eval.distractors=/d", "student.mapper=mlp", "eval.checkpoints=/x,/y"]
    )
    assert from_dict(to_dict(config)) == config
    flat = flatten(config)
    assert flat["student.mapper"] == "mlp" and flat["eval.distractor_counts"] == [10, 20]
    assert config.eval.checkpoints == ("/x", "/y")
    assert len(flat) == sum(len(dataclasses.fields(getattr(config, f.name))) for f in dataclasses.fields(config))


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.lrr=1", ["'train.lrr'", "'lr'", "'backbone_lr'"]),
        ("trian.lr=1", ["'trian'", "'train'", "'teacher'"]),
        ("train.lr=fast", ["'train.lr'", "float", "'fast'"]),
        ("train.epochs=1.5", ["'train.epochs'", "int"]),
        ("student.mapper=transformer", ["'student.mapper'", "'atl'", "'mlp'"]),
        ("cache.dtype=int8", ["'cache.dtype'", "'float16'", "'float32'"]),
        ("train.use_gpu=maybe", ["'train.use_gpu'", "bool"]),
        ("eval.distractor_counts=10,x", ["'eval.distractor_counts'"]),
        ("eval.distractor_counts=10", ["'eval.distractors'", "distractor_counts"]),
        ("eval.batch_size=0", ["'eval.batch_size'"]),
        ("train.torch_threads=-1", ["'train.torch_threads'", ">= 0"]),
        ("cache.input_timeout_s=0", ["'cache.input_timeout_s'", "> 0"]),
        ("loss.init_temperature=5", ["'loss.init_temperature'"]),
        ("token_learner.dim=100", ["'token_learner.dim'", "heads"]),
        ("lr=1", ["section.key=value"]),
    ],
)
def test_errors_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    for word in words:
        assert word in str(error.value)


def test_yaml_type_errors_and_bad_files(tmp_path):
    bad_type = tmp_path / "bad.yaml"
    bad_type.write_text("train:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_config(bad_type)
    flag = tmp_path / "flag.yaml"
    flag.write_text("train:\n  epochs: true\n")
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_config(flag)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(not_mapping)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_a_saved_config_with_a_retired_key_still_loads():
    from isa.config import RETIRED_KEYS, from_dict, to_dict

    saved = to_dict(Config())
    saved["prompt"]["domain_template"] = "a {domain} of {S}"  # what older checkpoints' config.json hold
    assert "prompt.domain_template" in RETIRED_KEYS and from_dict(saved) == Config()
    with pytest.raises(ConfigError, match="'prompt.domain_templat'"):
        from_dict({"prompt": {"domain_templat": "x"}})  # a key that never existed is still refused
