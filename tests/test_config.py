"""Schema holes a user can fall into: infinities, booleans or floats as integers, repeated keys."""

import pytest

from raymeta.config import SECTIONS, load_pipeline
from raymeta.errors import ConfigError
from raymeta.pipelines import find_pipeline, packaged_pipelines

BASE = "name: t\nmeta_train:\n  task:\n    dataset: digits\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            BASE + "    weight_decay: .inf\n",
            "meta_train.task.weight_decay: Input should be a finite number",
        ),
        (BASE + "  meta_lr: .inf\n", "meta_train.meta_lr: Input should be a finite number"),
        (BASE + "  meta_lr: .nan\n", "meta_train.meta_lr: Input should be a finite number"),
        (
            BASE + "    epochs: true\n",
            "meta_train.task.epochs: Input should be a valid integer (got True)",
        ),
        (
            BASE + "    epochs: 2.5\n",
            "meta_train.task.epochs: Input should be a valid integer (got 2.5)",
        ),
        (
            BASE + "    seed: yes\n",
            "meta_train.task.seed: Input should be a valid integer (got True)",
        ),
        (
            BASE + "    epochs: 2\n    epochs: 5\n",
            "line 6 is not valid YAML (duplicate key 'epochs')",
        ),
        ("name: t\nname: u\nmeta_train: {}\n", "line 2 is not valid YAML (duplicate key 'name')"),
        (BASE + "    nesterov: true\n", "nesterov needs momentum > 0"),
    ],
)
def test_schema_holes_are_refused_in_one_line(tmp_path, body, expected):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_valid_numbers_still_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        BASE + "    epochs: 2\n    weight_decay: 0\n    momentum: 0.9\n  meta_lr: 1e-3\n"
    )
    cfg = load_pipeline(path)
    assert cfg.meta_train.task.epochs == 2 and cfg.meta_train.task.weight_decay == 0.0
    assert cfg.meta_train.meta_lr == 1e-3


@pytest.mark.parametrize("name", packaged_pipelines())
def test_every_shipped_pipeline_is_valid(name):
    """A shipped pipeline a user runs by name (`raymeta run NAME`) parses and has a section."""
    cfg = load_pipeline(find_pipeline(name))
    assert cfg.name and any(getattr(cfg, s) is not None for s in SECTIONS)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            BASE + "  meta_bach_size: 50\n",
            "meta_train.meta_bach_size: unknown key; did you mean meta_batch_size?",
        ),
        (BASE + "    epochz: 3\n", "meta_train.task.epochz: unknown key; did you mean epochs?"),
        (BASE + "  t_vall: 5\n", "meta_train.t_vall: unknown key; did you mean t_val?"),  # old name
        (BASE + "colour: red\n", "colour: unknown key"),  # nothing close: no guess
        (
            "name: t\ntransfer:\n  methods:\n    - {schedule: fixed, lr: 0.1, parms: {}}\n",
            "transfer.methods.0.parms: unknown key; did you mean params?",
        ),
    ],
)
def test_an_unknown_key_names_the_closest_accepted_one(tmp_path, body, expected):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert str(err.value) == f"{path}: {expected}"
