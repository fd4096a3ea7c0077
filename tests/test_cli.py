"""What a new user meets first: every command's --help (keys, presets, defaults, plain text),
--print-config, --version, and the paper presets' refusal to train on synthetic scenes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssgan_dist import __version__
from ssgan_dist.config import Config, config_from_dict, keys, load_config, preset_names, preset_summary, yaml_value
from ssgan_dist.shell import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Every command: (its module, arguments that reach its parser's --help).
COMMANDS = {
    "train": ("ssgan_dist.train", []),
    "summary": ("ssgan_dist.summary", []),
    "submit": ("ssgan_dist.cluster.submit", []),
    "evaluate": ("ssgan_dist.evaluation.evaluate", []),
    "evaluate_segmenter": ("ssgan_dist.evaluation.evaluate_segmenter", []),
    "generate": ("ssgan_dist.evaluation.generate", []),
    "shards": ("ssgan_dist.data.build", []),
    **{f"shards {sub}": ("ssgan_dist.data.build", [sub]) for sub in ("sketchycoco", "folder", "synthetic", "verify")},
}
CONFIG_COMMANDS = ("train", "summary", "submit")


def _main(module: str):
    return __import__(module, fromlist=["main"]).main


def _help(name: str, capsys) -> str:
    module, args = COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        _main(module)([*args, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _parsers(name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser the command really builds (and its subcommands' parsers), caught on its way to --help."""
    module, args = COMMANDS[name]
    seen: list[argparse.ArgumentParser] = []
    for method in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, method)

        def catch(self, *a, _original=original, **kw):
            seen.append(self)
            return _original(self, *a, **kw)

        monkeypatch.setattr(argparse.ArgumentParser, method, catch)
    with pytest.raises(SystemExit):
        _main(module)([*args, "--help"])
    monkeypatch.undo()
    top = seen[0]
    subs = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return [top] + [p for s in subs for p in s.choices.values()]


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_help_lists_every_key_with_type_default_and_doc_and_every_preset(name, capsys):
    text = _help(name, capsys)
    lines = text.splitlines()
    for key, f, default in keys():
        line = next((ln for ln in lines if ln.startswith(f"  {key} (")), None)
        assert line is not None, f"{key} missing from {name} --help"
        assert f"default {yaml_value(default)})" in line, line
        assert f.metadata["doc"].split()[0] in text
    for preset in preset_names():
        summary = preset_summary(preset)
        assert summary, f"preset {preset} has no first comment line"
        assert any(ln.split() == [preset, *summary.split()] for ln in lines), preset


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_shows_its_default(name, monkeypatch):
    for parser in _parsers(name, monkeypatch):
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help, f"{parser.prog} {label}: no help text"
            if action.option_strings and not action.required and not isinstance(action, argparse._VersionAction):
                assert "default" in formatter._get_help_string(action), f"{parser.prog} {label}: default not shown"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_is_plain_text(name, capsys):
    text = _help(name, capsys)
    assert "``" not in text and "::\n" not in text, text


@pytest.mark.parametrize("name", ["train", "summary", "submit", "evaluate", "evaluate_segmenter", "generate", "shards"])
def test_version_on_every_command(name, capsys):
    module, _ = COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        _main(module)(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ssgan-dist {__version__}"


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_print_config_round_trips_through_config(name, tmp_path, capsys):
    module, _ = COMMANDS[name]
    overrides = ["train.max_steps=7", "model.sfm=false", "optim.lr_g=1e-3", "model.background_classes=[17, 18]",
                 f"run.dir={tmp_path / 'run'}"]
    assert _main(module)(["--config", "sketchycoco-256", *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert load_config(str(path)) == load_config("sketchycoco-256", overrides)
    assert _main(module)(["--config", str(path), "--print-config"]) == 0
    again = capsys.readouterr().out
    assert yaml.safe_load(again) == yaml.safe_load(printed)  # the same config (the comment line names the command)
    assert config_from_dict(yaml.safe_load(printed)) == load_config(str(path))
    assert not (tmp_path / "run").exists()  # printing is not running


def test_print_config_shows_the_preset_values_not_the_builtin_defaults(capsys):
    from ssgan_dist.train import main

    assert main(["--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["model"]["image_size"] == load_config().model.image_size == 64 != Config().model.image_size


def _console_script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install -e .)")
    return path


@pytest.mark.parametrize("argv, prog", [
    (["ssgan-shards"], "ssgan-shards"),
    ([sys.executable, "-m", "ssgan_dist.data.build"], "python -m ssgan_dist.data.build"),
    ([sys.executable, "cluster/submit.py"], "python cluster/submit.py"),
])
def test_help_names_the_command_as_typed(argv, prog):
    if argv[0].startswith("ssgan-"):
        argv = [str(_console_script(argv[0]))]
    out = subprocess.run([*argv, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {prog} "), out.stdout[:200]


def test_every_command_has_a_console_script():
    scripts = (ROOT / "pyproject.toml").read_text()
    for name in ("ssgan-train", "ssgan-shards", "ssgan-summary", "ssgan-evaluate", "ssgan-evaluate-segmenter",
                 "ssgan-generate", "ssgan-submit"):
        assert f'\n{name} = "' in scripts, name


# -- paper presets never train on synthetic scenes by accident ---------------------------


def test_paper_presets_allow_no_synthetic_data():
    for name in preset_names():
        cfg = load_config(name)
        if "demo" not in name:
            assert cfg.data.allow_synthetic is False, f"{name}: a paper preset must set data.allow_synthetic: false"


@pytest.mark.parametrize("preset", [p for p in preset_names() if "demo" not in p])
def test_paper_preset_without_shards_exits_2_naming_data_shards_before_any_work(preset, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ssgan_dist.train", "--config", preset, f"run.dir={run_dir}"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "data.shards" in out.stderr and "data.allow_synthetic" in out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()


def test_submitter_refuses_a_paper_preset_without_shards(tmp_path, capsys):
    from ssgan_dist.cluster.submit import main

    assert main(["--config", "sketchycoco-256", "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "data.shards" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_paper_preset_with_synthetic_allowed_on_purpose_passes_the_check():
    from ssgan_dist.config import require_training_data

    require_training_data(load_config("sketchycoco-256", ["data.allow_synthetic=true"]))
    require_training_data(load_config("sketchycoco-256", ["data.shards=/some/shards"]))


# -- packaging ---------------------------------------------------------------------------


def test_sketchycoco_builder_without_its_extra_names_the_extra(tmp_path):
    """scipy/h5py are the sketchycoco extra: without them the build stops at once, exit 2."""
    code = ("import sys; sys.modules['h5py'] = None; sys.modules['scipy'] = None; "
            "from ssgan_dist.data.build import main; "
            f"sys.exit(main(['sketchycoco', '--root', {str(tmp_path)!r}, '--split', 'val', '--out', "
            f"{str(tmp_path / 'out')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "pip install -e '.[sketchycoco]'" in out.stderr and "Traceback" not in out.stderr


def test_the_demo_path_imports_without_the_optional_extras():
    """Training, shards and generation import none of the extras' packages."""
    code = ("import sys\n"
            "for name in ('scipy', 'h5py', 'tensorboard', 'torch_fidelity', 'deepspeed', 'submitit', 'nvidia.dali'):\n"
            "    sys.modules[name] = None\n"
            "import ssgan_dist.train, ssgan_dist.data.build, ssgan_dist.evaluation.generate, ssgan_dist.summary\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
