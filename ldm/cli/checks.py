"""Config errors said in one line that names the key, before Hydra runs the job and before any model code
is imported.

`precheck` composes the config as Hydra is about to (the Compose API, same overrides) and turns each
mistake into one line: an unknown key gets the closest known one (`trainer.max_step` → `trainer.max_steps`)
instead of Hydra's `+key=` hint; a `+key=` that adds a key nothing reads is refused the same way (a
`_target_` node reads what its callable takes, nothing else reads added keys); a value of the wrong kind
(`trainer.max_steps=abc`) names the key, the value and what is accepted. `HYDRA_FULL_ERROR=1` skips it, so
Hydra's own traceback shows.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import shlex
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parent.parent / "conf"
# Flags after which Hydra does not run a job, or runs several (sweeps compose per job): no precheck.
NO_PRECHECK_FLAGS = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info", "-sc", "--shell-completion"}
_KIND = {bool: "true or false", int: "an integer", float: "a number"}
# Every flag of Hydra's own command line (the rest of a command line is key=value overrides).
HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p", "--package", "-r",
               "--run", "-m", "--multirun", "-sc", "--shell-completion", "-cp", "--config-path", "-cn",
               "--config-name", "-cd", "--config-dir", "--experimental-rerun", "-i", "--info"}
# The names diffusers' scripts, kohya's sd-scripts and AUTOMATIC1111 give settings that have a key here.
ALIASES = {
    "cfg_scale": "guidance_scale", "scale": "guidance_scale", "num_inference_steps": "steps",
    "ddim_steps": "steps", "sampling_steps": "steps", "sample_steps": "steps", "sampler_name": "sampler",
    "sample_sampler": "sampler", "n_samples": "num_images", "num_images_per_prompt": "num_images",
    "images_per_prompt": "num_images", "outdir": "out_dir", "output_dir": "out_dir", "negative": "negative_prompt",
    "neg_prompt": "negative_prompt", "H": "height", "W": "width", "from_file": "prompt_file",
    "ckpt_path": "ckpt", "checkpoint": "ckpt", "model_path": "ckpt", "pretrained_model_name_or_path": "init_from",
    "precision": "dtype", "network_weights": "lora", "network_mul": "lora_scale", "lora_weights": "lora",
    "max_train_steps": "trainer.max_steps", "max_steps": "trainer.max_steps", "learning_rate": "module.optimizer.lr",
    "lr": "module.optimizer.lr", "train_batch_size": "data.batch_size", "batch_size": "data.batch_size",
    "resolution": "data.resolution", "resume_from_checkpoint": "ckpt_path", "resume": "ckpt_path",
    "train_data_dir": "data.train_shards", "mixed_precision": "trainer.precision",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches", "max_grad_norm": "trainer.gradient_clip_val",
    "num_train_epochs": "trainer.max_epochs", "max_train_epochs": "trainer.max_epochs",
}


class ConfigProblem(ValueError):
    """A command line that cannot run as typed; the message names the key and the fix."""


def config_groups() -> set[str]:
    return {p.relative_to(CONF).as_posix() for p in CONF.rglob("*") if p.is_dir() and p.name != "__pycache__"}


def _split(override: str) -> tuple[str, str, str]:
    head, _, value = override.partition("=")
    prefix = re.match(r"\+\+|\+|~", head)
    prefix_text = prefix.group(0) if prefix else ""
    return prefix_text, head[len(prefix_text) :], value


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain container (lists are leaves)."""
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            keys.append(key)
            keys.extend(flat_keys(v, key))
    return keys


def closest_key(key: str, known: list[str]) -> str | None:
    """The known key a typo most likely meant: the key other tools' scripts call it by, then one among its
    siblings, then the one key anywhere with a close last part (compared by last parts, so `sampler.step` is
    `steps`, not `sampler.eta` for their shared `sampler.`), then the closest whole key."""
    parent, _, leaf = key.rpartition(".")
    for name in (key, leaf):
        for target in (ALIASES.get(name), ALIASES.get(name.lower())):
            if target in known and target != key:
                return target
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.6)
    if match:
        return f"{parent}.{match[0]}" if parent else match[0]
    by_leaf = [k for k in known if difflib.get_close_matches(leaf, [k.rpartition(".")[2]], n=1, cutoff=0.8)]
    if len(by_leaf) == 1:
        return by_leaf[0]
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _lookup(node: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _compose(config_name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=False)


def _did_you_mean(key: str, known: list[str]) -> str:
    guess = closest_key(key, known)
    return f" (did you mean {guess}?)" if guess else ""


def _explain_composition(err: Exception, overrides: list[str], config_name: str, groups: set[str]) -> str:
    text = str(err)
    cause = str(err.__cause__ or "")
    group_choices = [o for o in overrides if _split(o)[1] in groups]
    m = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    already = re.search(r"An item is already at '([^']+)'", text + cause)
    if already:
        key = already.group(1)
        return f"{key} is already a key: set it without the '+', as {key}=..."
    if m:
        key = m.group(1)
        try:
            known = flat_keys(_compose(config_name, group_choices))
        except Exception:
            known = []
        group, _, leaf = key.partition(".")
        chosen = next((_split(o)[2] for o in reversed(group_choices) if _split(o)[1] == group), None)
        takes = sorted(p.stem for p in (CONF / group).glob("*.yaml") if re.search(rf"(?m)^{re.escape(leaf)}:", p.read_text())) if group in groups and "." not in leaf else []
        if takes and chosen:
            return f"{group}={chosen} has no {leaf}: {key} applies to {group}={' or '.join(takes)}"
        return f"unknown key {key}{_did_you_mean(key, known)}; `python {config_name}.py --cfg job` lists the keys"
    ambiguous = re.search(r"Ambiguous value for argument '([^'=]+)=(-?\d+),(\d+)'", text)
    if ambiguous:
        key, whole, part = ambiguous.groups()
        try:
            found, default = _lookup(_compose(config_name, group_choices), key.lstrip("+"))
        except Exception:
            found, default = False, None
    if ambiguous and found and isinstance(default, float):  # 7,5 typed for 7.5 (a decimal comma)
        return f"{key}={whole},{part} is a list to Hydra: a number takes a decimal point, as {key}={whole}.{part}"
    missing_group = re.search(r"Could not find '([^']+)'", text)
    if missing_group:
        group, _, choice = missing_group.group(1).rpartition("/")
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml")) if group else []
        if not options:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return " ".join(lines).split(" Config search path:")[0].replace("Available options in", "; available options in")
        lower = {o.lower(): o for o in options}
        guess = lower.get(choice.lower()) or next(iter(difflib.get_close_matches(choice, options, n=1, cutoff=0.6)), None)
        hint = f" (did you mean {group}={guess}?)" if guess else ""
        return f"Could not find '{group}/{choice}'{hint}; available options in '{group}': {' '.join(options)}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _accepts(target: str, name: str) -> tuple[bool, list[str]]:
    """Whether the callable `target` takes a keyword `name`, and the names it does take."""
    module_name, _, attr = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    names: list[str] = []
    # A class whose __init__ passes **kwargs on takes what its bases take: follow the MRO until one does not.
    for fn in [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]:
        if fn is object.__init__:
            return True, names  # the chain ends in **kwargs nobody names: cannot tell, so allow
        params = inspect.signature(fn).parameters
        names += [p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        if not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
            break
    else:
        return True, names
    return name in names, names


def _check_added_keys(base: dict[str, Any], final: dict[str, Any], overrides: list[str]) -> list[str]:
    problems = []
    for override in overrides:
        prefix, key, raw = _split(override)
        if prefix not in ("+", "++") or "/" in key:
            continue
        if prefix == "+" and _lookup(base, key)[0]:
            problems.append(f"{key} is already a key: set it without the '+', as {key}={raw}")
            continue
        found, value = _lookup(final, key)
        if not found or (isinstance(value, dict) and "_target_" in value):
            continue  # a whole new component brings its own _target_
        parent, _, name = key.rpartition(".")
        if name.startswith("_") and name.endswith("_"):
            continue  # Hydra's own keys of a node (_target_, _partial_, _args_, ...)
        _, parent_node = _lookup(final, parent) if parent else (True, final)
        others = [k for k in flat_keys(final) if k != key]
        if isinstance(parent_node, dict) and isinstance(parent_node.get("_target_"), str):
            takes, names = _accepts(parent_node["_target_"], name)
            if not takes:
                guess = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                hint = f" (did you mean {parent}.{guess[0]}?)" if guess else ""
                problems.append(f"+{key}: {parent_node['_target_']} takes no argument {name!r}{hint}")
            continue
        problems.append(f"+{key} adds a key nothing reads{_did_you_mean(key, others)}")
    return problems


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_value_kinds(base: dict[str, Any], final: dict[str, Any], overrides: list[str]) -> list[str]:
    problems = []
    for index, override in enumerate(overrides):
        prefix, key, raw = _split(override)
        if prefix or "." not in key and key in config_groups():
            continue
        if any(_split(later)[1] == key for later in overrides[index + 1 :]):
            continue  # a later override of the key wins: the value in `final` is that one's, not this one's
        had, before = _lookup(base, key)
        found, after = _lookup(final, key)
        if not (had and found) or before is None or after is None or _is_interpolation(after):
            continue
        kind = type(before)
        if kind not in _KIND:
            continue
        ok = isinstance(after, bool) if kind is bool else (
            isinstance(after, int) and not isinstance(after, bool) if kind is int
            else isinstance(after, int | float) and not isinstance(after, bool)
        )
        if not ok:
            problems.append(f"{key}={raw}: expected {_KIND[kind]} (like {key}={before})")
    return problems


def _not_a_flag(config_name: str, args: list[str], index: int) -> str:
    """What to type instead of an argparse-style `--key value` / `--key=value` (other tools' scripts)."""
    flag, eq, value = args[index].partition("=")
    following = args[index + 1] if index + 1 < len(args) else None
    if not eq and following is not None and not following.startswith("-") and "=" not in following:
        value = following
    name = flag.lstrip("-").replace("-", "_")
    try:
        known = flat_keys(_compose(config_name, [a for a in args if "=" in a and not a.startswith("-")]))
    except Exception:
        known = []
    key = name if name in known else closest_key(name, known)
    if key is None:
        return (f"{flag} is not an option of python {config_name}.py: settings are key=value overrides "
                f"(`python {config_name}.py --help` lists them)")
    if not value:
        value = "..."
    elif not re.fullmatch(r"[\w./:,+@%~-]+", value):
        value = f'"{value}"' if not re.search(r'["$`\\]', value) else shlex.quote(value)
    return (f"{flag} is not an option of python {config_name}.py: settings are key=value overrides, "
            f"as {key}={value} (`python {config_name}.py --help` lists them)")


def _out_dir_problem(final: dict[str, Any]) -> str | None:
    """The folder Hydra makes before the job runs (`out_dir`, train.py's `paths.root`) where a file is."""
    for key in ("out_dir", "paths.root"):
        found, value = _lookup(final, key)
        if not found or not isinstance(value, str) or "${" in value:
            continue
        path = Path(value).expanduser()
        for folder in (path, *path.parents):
            if folder.exists():
                if not folder.is_dir():
                    return f"{key}={value}: {folder} is a file, not a folder: give a folder to write into"
                break
    return None


def precheck(config_name: str, args: list[str]) -> None:
    """Raise ConfigProblem (one line) for a command line that would fail inside Hydra or deep in the run."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a in NO_PRECHECK_FLAGS for a in args):
        return
    flags_with_values = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                         "--config-dir", "-cd", "--experimental-rerun"}
    for index, arg in enumerate(args):
        if arg.startswith("-") and arg.partition("=")[0] not in HYDRA_FLAGS and not re.fullmatch(r"-\d.*", arg):
            raise ConfigProblem(_not_a_flag(config_name, args, index))
    for previous, arg in zip(["", *args], args, strict=False):  # (argument before, argument); no arguments: none
        if arg.lower() in ("help", "-help", "/?", "?") and previous not in flags_with_values:
            raise ConfigProblem(f"{arg!r} is not an override (key=value): `python {config_name}.py --help` lists the settings")
        if "=" not in arg and not arg.startswith("-") and previous not in flags_with_values:
            head, eq, value = previous.partition("=")
            typed = f'{head}="{value} {arg}"' if eq and not previous.startswith("-") and "'" not in value else None
            raise ConfigProblem(
                f"{arg!r} is not an override (key=value): a value with spaces needs quotes in the shell, "
                + (f"as {typed}" if typed else f"e.g. key=\"{arg} ...\"")
            )
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    groups = config_groups() | {"hydra/launcher"}
    try:
        final = _compose(config_name, overrides)
    except Exception as err:  # Hydra's ConfigCompositionException, OverrideParseException, MissingConfigException
        message = _explain_composition(err, overrides, config_name, groups)
        raise ConfigProblem(message) from None
    group_choices = [o for o in overrides if _split(o)[1] in groups]
    try:
        base = _compose(config_name, group_choices) if group_choices != overrides else final
    except Exception:
        base = {}
    out_dir = _out_dir_problem(final)
    if out_dir:
        raise ConfigProblem(out_dir)
    problems = _check_added_keys(base, final, overrides)
    value_overrides = [o for o in overrides if not _split(o)[0] and _split(o)[1] not in groups]
    if value_overrides and not problems:
        problems = _check_value_kinds(base, final, value_overrides)
    if problems:
        raise ConfigProblem("; ".join(problems))


def exit_with_usage_error(tool: str, err: BaseException) -> None:
    """Bad input the message explains: `<tool>: error: <message>` alone on stderr and exit status 2, as
    train.py, argparse and Hydra's own override errors do (not 1, a crash's status). With HYDRA_FULL_ERROR=1
    the error is raised again instead, traceback and all. Call it from the `except` that caught `err`."""
    import os
    import sys

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"{tool}: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def run_cli(config_name: str, hydra_main: Any, extra_overrides: Any = None, tool: str | None = None) -> None:
    """A console entry point: the command line as typed (ldm.cli.overrides), checked here, then Hydra.
    `extra_overrides(args) -> list[str]`, when given, adds overrides Hydra must see before it starts
    (train.py: the run folder of a resumed run). `tool` is the command's name where it is not
    `<config_name>.py` (ldm-eval, ldm-compare): errors then name it."""
    import sys

    from ldm.cli.overrides import rewrite_argv

    sys.argv[1:] = rewrite_argv(sys.argv[1:])
    try:
        precheck(config_name, sys.argv[1:])
        if extra_overrides is not None:
            sys.argv[1:] = [*sys.argv[1:], *extra_overrides(sys.argv[1:])]
    except ConfigProblem as err:
        message = str(err) if tool is None else str(err).replace(f"python {config_name}.py", tool)
        print(f"{tool or config_name + '.py'}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_main()

