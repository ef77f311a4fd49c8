"""Every command-line flag and XMODAL_* variable that a message tells the user to use exists.

A message that recommends `--cache-dir DIR` when no command has that flag sends a newcomer
nowhere. The strings are collected from the source with an AST walk (no import side effects):

- messages: string constants and f-string parts inside `raise ...`, inside any call whose
  name ends in `Error` (helpers build errors and return them), `warnings.warn`,
  `log.warning/error/...`, `parser.error`, `print(..., file=sys.stderr)`, and argparse
  `help=` / `description=` texts (module docstrings used as descriptions included);
- everything else: every other string constant of the package, docstrings included.

Attribution: a flag must be known to ANY `xmodal` sub-command parser (the messages come from
code shared by several commands, e.g. the weights resolver serves eval, index, embed and
train, so per-command attribution would be guesswork). Flags of other tools that the text
names on purpose are listed in EXTERNAL with the tool. Each XMODAL_* variable must be
documented in README.md or docs/*.md.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from xmodal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "xmodal"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
ENV = re.compile(r"\bXMODAL_[A-Z0-9_]+\b")

#: flags of other programs that xmodal's texts name deliberately -> the program
EXTERNAL = {
    "--nproc_per_node": "torchrun",
    "--nproc-per-node": "torchrun",
    "--nnodes": "torchrun",
    "--node_rank": "torchrun",
    "--rdzv-backend": "torchrun",
    "--rdzv-endpoint": "torchrun",
    "--rdzv-id": "torchrun",
    "--local-dir": "huggingface-cli download",
}

_LOG_METHODS = {"warning", "warn", "error", "exception", "critical", "info"}


def parser_flags(parser: argparse.ArgumentParser) -> Set[str]:
    """Option strings of a parser and all of its sub-parsers."""
    flags: Set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _is_message_call(node: ast.Call) -> bool:
    name = _call_name(node)
    if name.endswith("Error") or name in ("warn", "fail", "weights_not_found", "missing_media_error"):
        return True
    if isinstance(node.func, ast.Attribute) and name in _LOG_METHODS:
        return True
    if name == "print":
        return any(kw.arg == "file" and "stderr" in ast.unparse(kw.value) for kw in node.keywords)
    return False


def _strings(node: ast.AST) -> Iterator[ast.Constant]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub


def collect(source: str, filename: str) -> Tuple[List[Tuple[str, int, str]], List[Tuple[str, int, str]]]:
    """(message strings, other strings) of one module as (file, line, text)."""
    tree = ast.parse(source, filename)
    messages: Dict[int, Tuple[str, int, str]] = {}
    for node in ast.walk(tree):
        parts: List[ast.AST] = []
        if isinstance(node, ast.Raise) and node.exc is not None:
            parts.append(node.exc)
        elif isinstance(node, ast.Call):
            if _is_message_call(node):
                parts += list(node.args) + [kw.value for kw in node.keywords]
            elif _call_name(node) in ("add_argument", "add_parser", "ArgumentParser", "add_argument_group",
                                      "add_subparsers"):
                parts += [kw.value for kw in node.keywords if kw.arg in ("help", "description", "epilog")]
        for part in parts:
            for const in _strings(part):
                messages[id(const)] = (filename, const.lineno, const.value)
    doc = ast.get_docstring(tree)
    if doc and "description=__doc__" in source:  # the module docstring is the command's --help text
        messages[id(tree)] = (filename, 1, doc)
    others = [(filename, c.lineno, c.value) for c in _strings(tree) if id(c) not in messages]
    return list(messages.values()), others


def _sources() -> List[Tuple[str, List, List]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        messages, others = collect(path.read_text(encoding="utf-8"), rel)
        out.append((rel, messages, others))
    return out


@pytest.fixture(scope="module")
def known_flags() -> Set[str]:
    return parser_flags(build_parser())


@pytest.fixture(scope="module")
def strings():
    return _sources()


def _unknown_flags(texts, known: Set[str]) -> List[str]:
    bad = []
    for filename, line, text in texts:
        for flag in FLAG.findall(text):
            if flag not in known and flag not in EXTERNAL:
                bad.append(f"{filename}:{line}: {flag}  (in: {text.strip()[:100]!r})")
    return bad


def _documentation() -> str:
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    return "\n".join(p.read_text(encoding="utf-8") for p in docs if p.is_file())


def test_the_collector_finds_messages():
    """The AST walk sees raise / error helpers / warnings / stderr prints / help texts, and not code."""
    src = '''
import sys, warnings
def f(x):
    how = "plain"
    if x:
        raise ValueError(f"use --alpha {x}")
    warnings.warn("try --beta")
    log.warning("or --gamma %s", x)
    print("see --delta", file=sys.stderr)
    print("stdout --epsilon")
    p.add_argument("--zeta", help="like --eta")
    return fail(path, "where", "expected --theta")
'''
    messages, others = collect(src, "m.py")
    flags = {f for _, _, t in messages for f in FLAG.findall(t)}
    assert flags == {"--alpha", "--beta", "--gamma", "--delta", "--eta", "--theta"}
    assert {f for _, _, t in others for f in FLAG.findall(t)} == {"--epsilon", "--zeta"}


def test_the_check_catches_a_flag_no_parser_has(known_flags):
    """The case that started this: the weights error recommended `--cache-dir` before any command had it."""
    old = [("backbones/weights.py", 128, "(a) an OpenCLIP tag whose file is already in a local cache (--cache-dir DIR")]
    assert _unknown_flags(old, {f for f in known_flags if f != "--cache-dir"}) == [
        "backbones/weights.py:128: --cache-dir  (in: '(a) an OpenCLIP tag whose file is already in a local cache "
        "(--cache-dir DIR')"]


def test_messages_name_only_flags_the_cli_knows(strings, known_flags):
    bad = [b for _, messages, _ in strings for b in _unknown_flags(messages, known_flags)]
    assert not bad, "messages/help name flags no xmodal command has:\n" + "\n".join(bad)


def test_other_texts_name_only_flags_the_cli_knows(strings, known_flags):
    """Docstrings and other strings (examples in module docs, usage lines) are read by users too."""
    bad = [b for _, _, others in strings for b in _unknown_flags(others, known_flags)]
    assert not bad, "texts name flags no xmodal command has:\n" + "\n".join(bad)


def test_the_weights_error_names_cache_dir_that_exists(known_flags):
    """The missing-weights message must point at a real flag, and eval/index/embed accept it."""
    from xmodal.backbones.weights import weights_not_found

    text = str(weights_not_found("ViT-B-32", "openai", "not cached"))
    assert "--cache-dir" in text and "model.cache_dir" in text
    parser = build_parser()
    for command in ("eval", "index", "embed"):
        args = parser.parse_args([command, "--cache-dir", "/w", "--out", "o", "--dataset", "jsonl"])
        assert args.cache_dir == "/w", command


def test_cache_dir_flag_reaches_the_config(tmp_path):
    from xmodal.cli.eval import resolve_settings

    (tmp_path / "test.jsonl").write_text('{"image": "a.png", "captions": ["a"]}\n')
    args = build_parser().parse_args(["eval", "--dataset", "jsonl", "--root", str(tmp_path), "--backbone",
                                      "xmodal-test", "--pretrained", "random", "--cache-dir", str(tmp_path)])
    cfg, settings = resolve_settings(args)
    assert cfg.model.cache_dir == str(tmp_path) and settings.source["model.cache_dir"] == "flag"


def test_every_xmodal_variable_is_documented(strings):
    docs = _documentation()
    named: Dict[str, str] = {}
    for _, messages, others in strings:
        for filename, line, text in messages + others:
            for var in ENV.findall(text):
                named.setdefault(var, f"{filename}:{line}")
    assert "XMODAL_ALLOW_DOWNLOAD" in named  # the collector sees the variable the weights error names
    missing = [f"{var} (named at {where})" for var, where in sorted(named.items()) if var not in docs]
    assert not missing, "XMODAL_* variables named in the source but documented nowhere in README.md/docs/: " + \
        ", ".join(missing)


def test_documents_named_in_texts_exist(strings):
    """A message that says 'see docs/DATA.md' must point at a file that is there."""
    named = {(m, f"{filename}:{line}") for _, messages, others in strings for filename, line, text in messages + others
             for m in re.findall(r"\bdocs/[\w.-]+\.md\b", text)}
    assert any(m == "docs/DATA.md" for m, _ in named)
    missing = sorted(f"{m} (named at {where})" for m, where in named if not (ROOT / m).is_file())
    assert not missing, missing
