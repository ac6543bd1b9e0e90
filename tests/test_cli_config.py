"""prune/heal --config: a TOML file, or the configuration a plan records; flags on the command line win."""

import json
from pathlib import Path

import pytest

from onnxprune.cli import build_parser, main, parse_args
from onnxprune.config import config_keys
from onnxprune.plan import Plan, load_plan

ROOT = Path(__file__).resolve().parents[1]
RESNET20, CALIB = str(ROOT / "models" / "resnet20.onnx"), str(ROOT / "models" / "cifar10_calib512.npz")


def prune(argv, capsys) -> dict:
    assert main(["prune", RESNET20, *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_toml_driven_prune_equals_the_flag_driven_one(tmp_path, capsys):
    by_flags = prune(["--data", CALIB, "--samples", "64", "--remove-blocks", "2", "-o", str(tmp_path / "a.onnx")],
                     capsys)
    config = toml(tmp_path / "c.toml", f'data = "{CALIB}"\nsamples = 64\nremove-blocks = 2\n'
                                       f'output = "{tmp_path / "b.onnx"}"\n')
    by_file = prune(["--config", str(config)], capsys)
    assert by_file["removed_blocks"] == by_flags["removed_blocks"] and len(by_file["removed_blocks"]) == 2
    a, b = load_plan(tmp_path / "a.plan.json"), load_plan(tmp_path / "b.plan.json")
    assert (a.remove_blocks, a.predicted, a.fingerprint) == (b.remove_blocks, b.predicted, b.fingerprint)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    without_output = [{k: v for k, v in p.config["prune"].items() if k != "output"} for p in (a, b)]
    assert without_output[0] == without_output[1]
    assert {"data": CALIB, "samples": 64, "remove-blocks": 2} .items() <= without_output[0].items()
    assert "json" not in a.config["prune"] and "quiet" not in a.config["prune"]  # how it reports is not recorded


def test_flags_override_the_file(tmp_path):
    config = toml(tmp_path / "c.toml", 'speedup = 1.5\nsamples = 64\ndata = "x.npz"\none_shot = true\n'
                                       'memory-budget = "64M"\nmean = [0.5, 0.5, 0.5]\noutput = "o.onnx"\n')
    args = parse_args(["prune", RESNET20, "--config", str(config), "--remove-blocks", "1", "--samples", "32"])
    # --remove-blocks excludes the file's --speedup; the other keys are the file's, converted as flags would be
    assert (args.remove_blocks, args.speedup, args.samples, args.data) == (1, None, 32, "x.npz")
    assert args.one_shot and args.memory_budget == 64 << 20 and args.mean == (0.5, 0.5, 0.5)
    assert args.effective_config["samples"] == 32 and "speedup" not in args.effective_config
    args = parse_args(["prune", RESNET20, "--config", str(config), "-o", "other.onnx"])
    assert (args.speedup, args.remove_blocks, args.output) == (1.5, None, "other.onnx")
    heal = toml(tmp_path / "h.toml", 'teacher = "t.onnx"\nsteps = 300\nno-augment = true\nlabel-free = false\n')
    args = parse_args(["heal", "p.onnx", "-o", "h.onnx", "--config", str(heal), "--epochs", "2"])
    assert (args.teacher, args.heal_epochs, args.heal_steps, args.heal_augment, args.label_free) == \
        ("t.onnx", 2.0, None, False, False)
    assert args.effective_config["no-augment"] is True and "label-free" not in args.effective_config


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\nheal_stepz = 3\nsamples = 8\n", "unknown keys bogus, heal_stepz for prune"),
    ('samples = "many"\n', "samples = 'many'"),
    ('method = "magic"\n', "choose one of slp, layermerge"),
    ("one-shot = 1\n", "a switch"),
    ("speedup = 1.5\nremove-blocks = 2\n", "exclude each other"),
    ("samples = 8\nsamples_ = 1\n[prune]\n", "unknown key"),
    ("samples = \n", "not valid TOML"),
])
def test_a_bad_config_exits_2_naming_the_key(tmp_path, capsys, text, message):
    config = toml(tmp_path / "c.toml", text)
    out = tmp_path / "o.onnx"
    assert main(["prune", RESNET20, "--remove-blocks", "1", "--config", str(config), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: --config") and message in err[0], err
    assert not out.exists()


def test_the_plan_records_the_config_and_rerunning_from_it_gives_the_same_plan(tmp_path, capsys):
    first = prune(["--data", CALIB, "--samples", "64", "--remove-blocks", "2", "--batch", "32",
                   "-o", str(tmp_path / "a.onnx")], capsys)
    plan_a = load_plan(first["plan"])
    assert plan_a.config["prune"]["batch"] == 32 and plan_a.config["prune"]["remove-blocks"] == 2
    assert Plan.from_dict(plan_a.to_dict()).config == plan_a.config  # round trip
    again = prune(["--config", first["plan"], "-o", str(tmp_path / "b.onnx")], capsys)
    plan_b = load_plan(again["plan"])
    assert {k: v for k, v in plan_a.to_dict().items() if k != "config"} == \
        {k: v for k, v in plan_b.to_dict().items() if k != "config"}
    assert {**plan_b.config["prune"], "output": None} == {**plan_a.config["prune"], "output": None}
    # a plan without a heal part is no heal config
    assert main(["heal", again["output"], "--teacher", RESNET20, "--config", again["plan"], "-o",
                 str(tmp_path / "h.onnx")]) == 2
    assert "records no heal configuration" in capsys.readouterr().err


def test_every_option_of_prune_and_heal_is_a_config_key():
    parser = build_parser()
    for verb in ("prune", "heal"):
        sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[verb]
        keys = config_keys(sub)
        flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
        assert {f"--{k}" for k in keys} == flags - {"--help", "--config", "--debug"}
