"""Config: one dataclass, one flag per field, precedence demo < file < command line."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.config import (
    DEMO_RECIPE,
    Config,
    TrainerError,
    build_parser,
    config_dict,
    flag_name,
    load_config_file,
    parse_config,
    save_config,
)


def test_every_field_is_one_documented_flag():
    parser = build_parser()
    by_dest = {action.dest: action for action in parser._actions if action.dest != "help"}
    fields = [f.name for f in dataclasses.fields(Config)]
    assert sorted(by_dest) == sorted(fields)
    for name in fields:
        action = by_dest[name]
        assert flag_name(name) in action.option_strings
        assert "default: " in action.help, name  # the help states the default
        assert action.help.count("default:") == 1, name  # once: not "0.99 ... [default: none]"
    help_text = parser.format_help()
    for flag in ("--batch-size", "--amp", "--no-channels-last", "--resume", "--dali-decode"):
        assert flag in help_text
    assert "demo recipe: resnet18" in help_text  # the demo values are documented too


def test_demo_recipe_only_without_data():
    demo = parse_config([])
    for name, value in DEMO_RECIPE.items():
        assert getattr(demo, name) == value
    real = parse_config(["--train-list", "Train.txt"])
    assert (real.arch, real.image_size, real.epochs) == ("resnet50", 224, 90)
    assert real.output_dir == "runs/train"
    # A flag beats the demo recipe.
    assert parse_config(["--arch", "resnet34"]).arch == "resnet34"


def test_precedence_file_then_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('arch = "resnet34"\nbatch-size = 16\nlr = 1\nchannels_last = false\n')
    cfg = parse_config(["--config", str(config), "--batch-size", "4"])
    assert cfg.arch == "resnet34"  # file beats the demo recipe
    assert cfg.batch_size == 4  # command line beats the file
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # TOML int accepted for a float
    assert cfg.channels_last is False
    # The file's train_list switches the demo recipe off, like the flag does.
    config.write_text('train_list = "Train.txt"\n')
    assert parse_config(["--config", str(config)]).arch == "resnet50"


def test_config_file_errors_name_file_and_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("epochz = 3\n")
    with pytest.raises(TrainerError, match=r"run\.toml: unknown setting\(s\) epochz"):
        load_config_file(str(config))
    config.write_text('epochs = "three"\n')
    with pytest.raises(TrainerError, match=r"run\.toml: epochs = 'three' should be int"):
        load_config_file(str(config))
    config.write_text("epochs = \n")
    with pytest.raises(TrainerError, match="not valid TOML"):
        load_config_file(str(config))
    with pytest.raises(TrainerError, match="config file not found"):
        load_config_file(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    "line, message",
    [
        ("image_size = 0", "--image-size must be > 0, got 0"),
        ("batch-size = 0", "--batch-size must be > 0, got 0"),
        ("label_smoothing = 1.5", "--label-smoothing must be in"),
        ('loader = "foo"', "--loader must be one of dali, pil, pil-gpu, not 'foo'"),
        ('progressive_resize = "32:64"', "--progressive-resize takes START:END:RAMP_EPOCHS"),
        ("warmup_epochs = -1", "--warmup-epochs must be >= 0"),
    ],
)
def test_config_file_bad_value_names_the_file(tmp_path, line, message):
    config = tmp_path / "run.toml"
    config.write_text(line + "\n")
    with pytest.raises(TrainerError) as error:
        parse_config(["--config", str(config)])
    assert str(error.value).startswith(f"{config}: {message}")


def test_config_file_bad_value_overridden_or_not_from_the_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("image_size = 0\n")
    # The command line's value replaces the file's: nothing wrong is left.
    assert parse_config(["--config", str(config), "--image-size", "32"]).image_size == 32
    # A bad command-line value beside a file is the command line's: the file is not named.
    config.write_text("image_size = 32\n")
    with pytest.raises(TrainerError, match=r"^--epochs must be > 0, got 0$"):
        parse_config(["--config", str(config), "--epochs", "0"])


def test_config_file_key_given_twice(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("batch-size = 4\nbatch_size = 8\n")
    with pytest.raises(TrainerError, match=r"run\.toml: set twice .*: batch_size$"):
        parse_config(["--config", str(config)])


def test_boolean_flags_and_legacy_local_rank():
    cfg = parse_config(["--no-channels-last", "--sync-bn", "--compile"])
    assert (cfg.channels_last, cfg.sync_bn, cfg.compile) == (False, True, True)
    assert parse_config(["--local_rank=1"]).local_rank == 1
    assert parse_config(["--local-rank", "3"]).local_rank == 3
    assert parse_config([]).local_rank is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--label-smoothing", "1.5"], "--label-smoothing"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--checkpoint-minutes", "-1"], r"^--checkpoint-minutes must be >= 0, got -1.0$"),
        (["--weight-decay", "-1"], r"^--weight-decay must be >= 0, got -1.0$"),
        (["--clip-grad-norm", "-1"], r"^--clip-grad-norm must be >= 0, got -1.0$"),
        # Negative: the loaders refuse it late, without the flag; huge: torch.manual_seed
        # overflows at the first epoch (a traceback).
        (["--seed", "-1"], r"^--seed must be in \[0, 4294967295\], got -1$"),
        (["--seed", str(2**50)], "--seed must be in"),
        (["--output-dir", ""], r"^--output-dir must not be empty$"),  # was os.makedirs' traceback
        (["--val-list", ""], r"^--val-list must not be empty$"),  # was: no validation
    ],
)
def test_bad_values(argv, message):
    with pytest.raises(TrainerError, match=message):
        parse_config(argv)


def test_argparse_rejects_bad_choice(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--optimizer", "lamb"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_saved_config_reads_back(tmp_path):
    cfg = parse_config(["--train-list", "/data/my list.txt", "--lr", "0.05", "--no-compile"])
    path = tmp_path / "config.toml"
    save_config(cfg, str(path))
    again = parse_config(["--config", str(path)])
    assert config_dict(again) == config_dict(cfg)
    assert "local_rank" not in path.read_text()  # launch detail, not a setting of the run
    # Characters a TOML string cannot hold as they are (the file failed to read back).
    for folder in ("runs/a\nb", "runs/a\x7fb\x01", 'runs/"q"\\ é\t'):
        cfg = parse_config(["--train-list", "T.txt", "--output-dir", folder])
        save_config(cfg, str(path))
        assert parse_config(["--config", str(path)]).output_dir == folder


def test_saved_data_files_follow_another_train_list(tmp_path):
    # config.toml holds the val list and classes file found beside the run's train list.
    a, b = tmp_path / "a", tmp_path / "b"
    resolved = dict(
        train_list=str(a / "Train.txt"), val_list=str(a / "Test.txt"),
        classes=str(a / "classes.txt"), num_classes=3,
    )  # fmt: skip
    path = tmp_path / "config.toml"
    save_config(dataclasses.replace(parse_config([]), **resolved), str(path))
    again = parse_config(["--config", str(path)])
    assert {k: getattr(again, k) for k in resolved} == resolved  # as saved
    # Another --train-list: its own Test.txt and classes.txt, as without the file (they were
    # the old run's, silently).
    other = parse_config(["--config", str(path), "--train-list", str(b / "Train.txt")])
    assert (other.val_list, other.classes, other.num_classes) == (None, None, None)
    given = parse_config(
        ["--config", str(path), "--train-list", str(b / "Train.txt"), "--val-list", "v.txt"]
    )
    assert (given.val_list, given.classes) == ("v.txt", None)
    # Files the config names elsewhere were chosen, not found: they stay.
    path.write_text(f'train_list = "{a / "Train.txt"}"\nval_list = "{tmp_path / "v.txt"}"\n')
    kept = parse_config(["--config", str(path), "--train-list", str(b / "Train.txt")])
    assert kept.val_list == str(tmp_path / "v.txt")


def test_progressive_resize_schedule():
    from trainer.config import train_image_size

    cfg = parse_config(["--image-size", "64", "--progressive-resize", "32:64:4"])
    sizes = [train_image_size(cfg, epoch) for epoch in range(6)]
    assert sizes == [32, 40, 48, 56, 64, 64]
    assert train_image_size(parse_config(["--image-size", "48"]), 3) == 48  # off: as is
    for bad in ("32:64", "64:32:2", "32:64:0", "a:b:c", "4:64:2"):
        with pytest.raises(TrainerError, match="--progressive-resize"):
            parse_config(["--progressive-resize", bad])


def test_auto_augment_choices():
    assert parse_config(["--auto-augment", "trivial"]).auto_augment == "trivial"
    with pytest.raises(SystemExit):
        parse_config(["--auto-augment", "fancy"])
