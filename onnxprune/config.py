"""``--config FILE``: a verb's options from a TOML file, or from the configuration a plan recorded, applied as the
verb's argparse defaults so that flags on the command line win (README, "Config files (`--config`)"). Keys are the long flag names
without their dashes; values are converted and checked by the flag's own type and choices.
"""

from __future__ import annotations

import argparse
import json

from onnxprune.errors import OnnxPruneError

CONFIG_VERBS = ("prune", "heal")
_NOT_CONFIGURABLE = {"help", "config", "debug"}
# how a run reports and where it runs, not what it does: a plan's config leaves them out
_NOT_RECORDED = {"json", "quiet", "report", "ray", "ray_resource", "ray_workers"}


def subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]


def config_keys(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of a verb that a config file may set, by key: the long flag name without its dashes."""
    keys = {}
    for action in sub._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in _NOT_CONFIGURABLE:
            keys[long[0][2:]] = action
    return keys


def load_config(path: str, verb: str) -> dict:
    """The options in a config file: a TOML file's keys, or a plan's (.json) recorded configuration of ``verb``."""
    import tomllib

    try:
        text = open(path, "rb").read().decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxPruneError(f"--config {path}: cannot read it ({exc})") from None
    if path.endswith(".json"):
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OnnxPruneError(f"--config {path} is not valid JSON: {exc}") from None
        config = (plan.get("config") or {}).get(verb) if isinstance(plan, dict) else None
        if not isinstance(config, dict):
            raise OnnxPruneError(f"--config {path}: the plan records no {verb} configuration (no \"config\" key "
                                 f"with a {verb!r} part)")
        return config
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OnnxPruneError(f"--config {path} is not valid TOML: {exc}") from None


def _config_value(action: argparse.Action, key: str, value: object, path: str) -> object:
    """A config value as the flag would have given it (converted and checked by the flag's own type and choices)."""
    where = f"--config {path}: {key} = {value!r}"
    if action.nargs == 0:  # a switch: true gives it, false leaves it off
        if not isinstance(value, bool):
            raise OnnxPruneError(f"{where}: {key} is a switch, true or false")
        return action.const if value else action.default
    if isinstance(value, (bool, dict)) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
        raise OnnxPruneError(f"{where}: expected what --{key} takes on the command line")
    text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    try:
        converted = action.type(text) if action.type else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise OnnxPruneError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise OnnxPruneError(f"{where}: choose one of {', '.join(map(str, action.choices))}")
    return converted


def apply_config(sub: argparse.ArgumentParser, verb: str, config: dict, path: str, given: set[str]) -> None:
    """Make the config's values the verb's defaults, so that flags on the command line (``given``: their dests)
    still win; within a group of flags that exclude each other, a flag given excludes the file's others."""
    keys = config_keys(sub)
    unknown = sorted(k for k in config if k.replace("_", "-") not in keys)
    if unknown:
        raise OnnxPruneError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                             f"{verb} (keys are the long flags of 'onnxprune {verb} --help' without their dashes)")
    values: dict[str, object] = {}
    for key, value in config.items():
        action = keys[key.replace("_", "-")]
        if action.dest in values:
            raise OnnxPruneError(f"--config {path}: {key} is given twice")
        values[action.dest] = _config_value(action, key, value, path)
    for group in sub._mutually_exclusive_groups:
        members = [a.dest for a in group._group_actions]
        set_here = [a.option_strings[-1].lstrip('-') for a in group._group_actions if a.dest in values]
        if len(set_here) > 1:
            raise OnnxPruneError(f"--config {path}: {' and '.join(set_here)} exclude each other")
        if given & set(members):
            for dest in members:
                values.pop(dest, None)
        elif set_here:
            group.required = False
    for action in sub._actions:
        if action.dest in values:
            action.required = False
    sub.set_defaults(**values)


def effective_config(sub: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The options a run used (the file's and the command line's), as a config (what plans record): switches
    that are on and every option with a value, except how the run reports (--json, --quiet, --report)."""
    config = {}
    for key, action in config_keys(sub).items():
        if action.dest in _NOT_RECORDED:
            continue
        value = getattr(args, action.dest, None)
        if action.nargs == 0:
            if value == action.const and value != action.default:
                config[key] = True
        elif value is not None:
            config[key] = list(value) if isinstance(value, tuple) else value
    return config


def record_config(plan_path: str, args: argparse.Namespace) -> None:
    """Write the run's configuration into the plan it wrote (key "config", by verb; earlier verbs' parts kept), so
    that ``--config PLAN`` repeats it."""
    if getattr(args, "effective_config", None) is None:
        return
    from onnxprune.plan import load_plan, save_plan

    plan = load_plan(plan_path)
    plan.config = {**(plan.config or {}), args.verb: args.effective_config}
    save_plan(plan, plan_path)
