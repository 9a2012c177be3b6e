"""The command line: entry points, recipes, and the README's reproduction commands."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from normsoftmax import TrainConfig


def test_console_entry_points():
    for command in ([sys.executable, "-m", "normsoftmax", "--help"], [str(Path(sys.executable).parent / "normsoftmax"),
                                                                      "train", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "normsoftmax" in result.stdout


def test_recipes_match_the_reference_commands_and_yield_to_explicit_values():
    config = TrainConfig.from_recipe("cub200", dataset_root="somewhere", lr=0.5)
    assert (config.dataset, config.dim, config.model_name, config.epochs_per_step,
            config.num_steps) == ("Cub200", 2048, "resnet50", 15, 2)
    assert (config.test_every_n_epochs, config.images_per_class, config.batch_size,
            config.class_balancing) == (5, 25, 75, True)
    assert config.lr == 0.5 and config.dataset_root == "somewhere"
    assert TrainConfig.from_recipe("sop").images_per_class == 5 and TrainConfig.from_recipe("cars196").lr == 0.01
    assert TrainConfig().batch_size == 64 and TrainConfig().class_balancing is False  # the reference script's defaults


def test_readme_reproduction_commands_parse_to_the_recipes():
    from normsoftmax.cli import build_parser, explicit_values
    from normsoftmax.config import build_config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = [line.split()[1:] for line in readme.splitlines() if line.startswith("normsoftmax train --dataset ")]
    assert len(commands) == 4
    recipes = {"Cub200": "cub200", "Cars196": "cars196", "StanfordOnlineProducts": "sop", "InShop": "inshop"}
    for argv in commands:
        args = build_parser().parse_args(argv)
        config = build_config(TrainConfig, explicit_values(args, TrainConfig))
        assert dataclasses.replace(config,
                                   recipe=recipes[config.dataset]) == TrainConfig.from_recipe(recipes[config.dataset])
