"""The command line as people type it, made into Hydra overrides before Hydra reads it.

Hydra's override grammar reads `a, b` as a list or sweep and refuses apostrophes, brackets, parentheses,
braces, `?`, `&`, `=` and non-ASCII letters in unquoted values. Nobody should need to learn it to write a
prompt or a shard pattern, so every CLI of the project passes its arguments through `rewrite_argv`:

- free-text keys (`prompt=`, `negative_prompt=`, `validation_prompts=`, ...: `FREE_TEXT_KEYS`) take the
  rest of the argument verbatim: commas, quotes, apostrophes, `(word:1.2)`, `[a|b]`, `=`, unicode.
  A value already quoted the Hydra way (`"negative_prompt='blurry, low quality'"`) keeps its meaning.
  A list key given one text (`validation_prompts=a cat, oil painting`) is a list of that one prompt;
  `validation_prompts=[a,b]` stays Hydra's list.
- any other value that Hydra's grammar cannot parse, but that is plainly a string (a brace range
  `shards/shard-{000000..000099}.tar`, a URL with `?` and `&`), is taken as that string.
- a path typed inside quotes with a leading `~` (`'ckpt=~/models/x.safetensors'`, where the shell left the
  `~` alone) is the home folder's, as the shell would have made it, not a folder named `~`.
- a value that looks like a structure (it opens with `[`, `{`, `(` or a quote, or holds `${`) is left
  to Hydra, whose error then gets the quoting that fixes it (`quoting_hint`).
"""

from __future__ import annotations

import os
import re

# Leaf names of keys whose values are free text, wherever they sit (`prompt`, `callbacks.x.prompt`, ...).
FREE_TEXT_KEYS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "instance_prompt",
        "class_prompt",
        "trigger",
        "trigger_word",
        "caption",
        "caption_prefix",
        "caption_suffix",
    }
)
# Leaf names of keys holding a list of free texts.
FREE_TEXT_LIST_KEYS = frozenset({"validation_prompts", "prompts", "negative_prompts"})

_KEY = re.compile(r"(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\-@/]*)")
_PARSER = None


def _parser():
    global _PARSER
    if _PARSER is None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        _PARSER = OverridesParser.create()
    return _PARSER


def hydra_quote(text: str) -> str:
    """`text` as a single-quoted Hydra value that parses (and resolves) back to exactly `text`.

    Hydra unescapes backslashes only in runs before a quote or at the end; OmegaConf would resolve `${`."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return "'" + escaped.replace("${", "\\${") + "'"


def _parses(arg: str) -> bool:
    try:
        _parser().parse_override(arg)
    except Exception:  # Hydra raises its own HydraException / OverrideParseException
        return False
    return True


def _is_quoted_string(value: str) -> bool:
    """A value the user already quoted the Hydra way: one quoted string, nothing around it."""
    if len(value) < 2 or value[0] not in "'\"" or value[-1] != value[0]:
        return False
    try:
        parsed = _parser().parse_override("k=" + value).value()
    except Exception:
        return False
    return isinstance(parsed, str)


def _plainly_text(value: str) -> bool:
    return bool(value) and value[0] not in "[{('\"" and "${" not in value


def _split(arg: str) -> tuple[str, str, str] | None:
    """(head, value, leaf key) of a `key=value` argument that may be rewritten; None for flags, `~key`,
    group choices with odd names and bare words."""
    if arg.startswith("-") or "=" not in arg:
        return None
    head, _, value = arg.partition("=")
    match = _KEY.fullmatch(head)
    if match is None or match["prefix"] == "~":
        return None
    return head, value, match["key"].rsplit(".", 1)[-1]


def _is_free_text(leaf: str, value: str) -> bool:
    return leaf in FREE_TEXT_KEYS or (leaf in FREE_TEXT_LIST_KEYS and not value.startswith("["))


def rewrite_arg(arg: str) -> str:
    """One command-line argument as the Hydra override it means (unchanged when it already is one)."""
    parts = _split(arg)
    if parts is None:
        return arg
    head, value, leaf = parts
    if (value == "~" or value.startswith("~/")) and not _is_free_text(leaf, value) and leaf not in FREE_TEXT_LIST_KEYS:
        value = os.path.expanduser(value)
        arg = f"{head}={value}"
    if _is_free_text(leaf, value):
        if _is_quoted_string(value):
            return arg
        return f"{head}={hydra_quote(value)}" if leaf in FREE_TEXT_KEYS else f"{head}=[{hydra_quote(value)}]"
    if leaf in FREE_TEXT_LIST_KEYS or _parses(arg) or not _plainly_text(value):
        return arg
    quoted = f"{head}={hydra_quote(value)}"
    return quoted if _parses(quoted) else arg


def rewrite_argv(args: list[str]) -> list[str]:
    """Every argument through `rewrite_arg`. Flags (`--cfg job`, `-m`) pass unchanged, and so do their
    values, which hold no `=`. Words the shell split off an unquoted prompt (`prompt=a red cat` arrives as
    `prompt=a`, `red`, `cat`) join it again: no override is a bare word, nor a word with an `=` and no key
    before it (`prompt=x = y`, `prompt=a =b`), nor a dash alone (`prompt=a cat - oil painting`)."""
    joined: list[str] = []
    for arg in args:
        previous = _split(joined[-1]) if joined else None
        part_of_text = "=" not in arg or _KEY.fullmatch(arg.partition("=")[0]) is None
        dash = set(arg) == {"-"}  # `prompt=a cat - oil painting`: a dash alone is no flag
        if previous and part_of_text and (dash or not arg.startswith("-")) and _is_free_text(previous[2], previous[1]):
            joined[-1] += " " + arg
        else:
            joined.append(arg)
    return [rewrite_arg(arg) for arg in joined]


def quoting_hint(arg: str) -> str:
    """What to type instead of an override Hydra refused."""
    head, _, value = arg.partition("=")
    return f"to pass the value as text, quote it for Hydra inside the argument: \"{head}={hydra_quote(value)}\""
