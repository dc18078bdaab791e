"""One-line messages for the CLI's argument errors.

jsonargparse reports a bad argument with the parser's usage and a nested explanation (40-60 lines for
a mistyped callback name). :func:`one_line` turns its message into one line that names the argument,
the bad value, what is allowed and, for a close misspelling, a did-you-mean (``difflib``). It reads
the message jsonargparse built; whatever it does not recognize keeps jsonargparse's most specific
line, so no error is ever hidden.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

# keys whose value is a class given by short name or class path (LightningCLI's subclass arguments)
_CLASS_KEYS = {"trainer.callbacks": "callback", "model": "model", "data": "datamodule",
               "optimizer": "optimizer", "lr_scheduler": "lr_scheduler"}
_SHOWN_CHOICES = 40


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'X'?"`` for the closest choice (difflib), or ``""``."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[value.lower()]] if value.lower() in lowered else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _listing(choices: Iterable[str]) -> str:
    choices = list(choices)
    shown = ", ".join(choices[:_SHOWN_CHOICES])
    return shown + (f", ... ({len(choices)} in all)" if len(choices) > _SHOWN_CHOICES else "")


def class_choices(kind: str) -> list[str]:
    """Short names the CLI resolves for a class argument: ours first, then Lightning's."""
    import lightning.pytorch.callbacks as pl_callbacks

    import lightning_tricks

    if kind == "callback":
        theirs = [n for n in pl_callbacks.__all__ if n not in lightning_tricks.CALLBACKS and n != "Callback"]
        return [*lightning_tricks.CALLBACKS, *sorted(theirs)]
    if kind == "model":
        return ["ImageClassifier"]
    if kind == "datamodule":
        return ["DigitsDataModule", "CIFAR10DataModule", "SyntheticDataModule"]
    return []


def init_parameters(class_path: str) -> list[str] | None:
    """The ``__init__`` parameter names of ``class_path`` (None if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        signature = inspect.signature(cls.__init__)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    return [p.name for p in list(signature.parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _importable(value: str) -> bool:
    module, _, name = value.rpartition(".")
    try:
        return bool(module) and hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def _given_value(message: str) -> str | None:
    found = re.search(r"Given value: (.*)$", message)
    return found.group(1).strip() if found else None


def _first_class_problem(message: str) -> tuple[str, str] | None:
    """The class path and the indented explanation of jsonargparse's first "Problem with given class_path"."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)- Problem with given class_path '([\w.]+)':", line)
        if found:
            indent = len(found.group(1))
            block = []
            for nested in lines[i + 1:]:
                if len(nested) - len(nested.lstrip()) <= indent:
                    break
                block.append(nested)
            return found.group(2), "\n".join(block)
    return None


def _explain_unknown_option(message: str, key: str) -> str | None:
    """``Problem with given class_path 'X': Option 'Y' is not accepted`` -> the class's parameters."""
    problem = _first_class_problem(message)
    found = problem and re.search(r"(?:Option '([\w.]+)' is not accepted|Key '([\w.]+)' is not expected)", problem[1])
    if not problem or not found:
        return None
    class_path, option = problem[0], found.group(1) or found.group(2)
    option = option.rsplit(".", 1)[-1]
    names = init_parameters(class_path) or []
    where = f"--{key}" if key else "a config"
    return (f"{where}: {class_path.rsplit('.', 1)[-1]} has no argument '{option}'{did_you_mean(option, names)} "
            f"Its arguments: {_listing(names) or '(none)'}.")


def _subclass_names(kind: str) -> set[str]:
    """Names of the imported subclasses of the kind's base class (what jsonargparse resolves short names to)."""
    import lightning.pytorch as pl

    base = {"callback": pl.Callback, "model": pl.LightningModule, "datamodule": pl.LightningDataModule}.get(kind)
    names, stack = set(), [base] if base else []
    while stack:
        for sub in stack.pop().__subclasses__():
            names.add(sub.__name__)
            stack.append(sub)
    return names


def _resolvable(name: str, kind: str) -> bool:
    return _importable(name) if "." in name else name in _subclass_names(kind)


def _explain_unknown_class(message: str, key: str) -> str | None:
    kind = _CLASS_KEYS.get(key)
    given = _given_value(message) or ""
    if kind is None:
        return None
    candidates = re.findall(r"'class_path': '([\w.]+)'", given) or re.findall(r"class_path '([\w.]+)'", message) \
        or ([given] if re.fullmatch(r"[\w.]+", given) else [])
    value = next((c for c in candidates if not _resolvable(c, kind)), None)
    if value is None:
        return None
    choices = class_choices(kind)
    return (f"--{key}: unknown {kind} '{value}'{did_you_mean(value.rsplit('.', 1)[-1], choices)} "
            f"Choices: {_listing(choices)}, or a class path such as my_package.My{kind.capitalize()}.")


def _explain_ambiguous(message: str, key: str) -> str | None:
    found = re.search(r"Multiple subclasses with name (\w+)\. Give the full class path to avoid ambiguity: (.*)$",
                      message, re.M)
    if not found:
        return None
    name, paths = found.groups()
    return f"--{key}: {name} is ambiguous in a config file; write its full class path: {paths.rstrip('.')}."


def _explain_type(message: str, key: str) -> str | None:
    problem = _first_class_problem(message)
    text = problem[1] if problem else message
    expected = list(dict.fromkeys(re.findall(r"Expected a <class '(\w+)'>", text)))
    value = re.search(r"(?:Got value|Given value): (.*)$", text, re.M)
    if not expected or not value:
        return None
    inner = re.search(r'Parser key "([^"]+)"', text) if problem else None
    full = f"{key}.{inner.group(1)}" if inner else key
    where = f" ({problem[0].rsplit('.', 1)[-1]}'s argument {inner.group(1)})" if problem and inner else ""
    allowed = " or ".join("None" if t == "NoneType" else t for t in expected)
    return f"--{full}={value.group(1).strip()}: expected a value of type {allowed}{where}."


def _explain_missing_file(message: str, key: str) -> str | None:
    found = re.search(r"File does not exist: '?([^'\n]+)'?", message)
    if not found:
        return None
    return missing_file_message(key or "config", found.group(1), (".yaml", ".yml", ".json"))


def missing_file_message(key: str, path: str, suffixes: tuple[str, ...]) -> str:
    """``--key: file not found: PATH`` and, when the folder exists, its files of that kind (did-you-mean)."""
    folder = Path(path).parent
    files = sorted(f.name for f in (folder.iterdir() if folder.is_dir() else ()) if f.suffix in suffixes)
    hint = did_you_mean(Path(path).name, files)
    kinds = "/".join(suffixes)
    there = f" {kinds} files in {folder}: {_listing(files)}." if files else f" No {kinds} file in {folder}."
    return f"--{key}: file not found: {path}{hint}{there}"


def _explain_unrecognized(message: str, options: Iterable[str]) -> str | None:
    found = re.match(r"unrecognized arguments: (.*)$", message.strip())
    if not found:
        return None
    given = found.group(1).split()
    names = [opt for opt in options if opt.startswith("--")]
    first = next((g for g in given if g.startswith("-")), given[0])
    option = first.split("=", 1)[0]
    return f"unrecognized argument {first}{did_you_mean(option, names)} Run with --help for every option."


def _most_specific_line(message: str) -> str:
    lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip(" -")]
    details = [ln for ln in lines if not ln.startswith(("Parser key", "Subtypes:", "Errors:", "Given value type",
                                                         "Does not validate", "Subclass types expect", "a "))]
    key = re.match(r'Parser key "([^"]+)"', message)
    head = f"--{key.group(1)}: " if key else ""
    return head + "; ".join(details[:2] or lines[:1])


def one_line(message: str, options: Iterable[str] = ()) -> str:
    """One line for a jsonargparse error ``message``; ``options`` are the parser's option strings."""
    key_match = re.match(r'Parser key "([^"]+)"', message)
    key = key_match.group(1) if key_match else ""
    for explain in (_explain_ambiguous, _explain_unknown_option, _explain_unknown_class, _explain_type,
                    _explain_missing_file):
        line = explain(message, key)
        if line:
            return line
    return _explain_unrecognized(message, options) or _most_specific_line(message)


def option_strings(parser: Any) -> list[str]:
    """Every ``--option`` of an argparse parser."""
    return [s for action in getattr(parser, "_actions", []) for s in action.option_strings]


def debugging() -> bool:
    """``LIGHTNING_TRICKS_DEBUG`` is set: show tracebacks instead of one-line errors."""
    return bool(os.environ.get("LIGHTNING_TRICKS_DEBUG"))


def run_command(command: str, run: Callable[[], int], stopped: type[BaseException] | None = None) -> NoReturn:
    """Exit with ``run()``'s status; an error of ours is one line on stderr and status 2 (1 for ``stopped``).

    ``lightning-tricks COMMAND: error: <message>`` (or ``stopped:``, when the command stopped on purpose);
    any other exception keeps its traceback, as does every error with ``LIGHTNING_TRICKS_DEBUG=1``.
    """
    from lightning_tricks.errors import user_error_in

    try:
        code = run()
    except Exception as err:
        cause = user_error_in(err)
        if cause is None or debugging():
            raise
        on_purpose = stopped is not None and isinstance(cause, stopped)
        print(f"lightning-tricks {command}: {'stopped' if on_purpose else 'error'}: {cause}", file=sys.stderr)
        raise SystemExit(1 if on_purpose else 2) from None
    raise SystemExit(code)
