"""Every flag of every `expertweave` subcommand that takes a number, a size, a duration or a path refuses a
bad value in argparse: one `error:` line naming the flag and the value, exit status 2, no traceback. The
flags are read from the parser itself, so a new one without a checking type fails here."""

import argparse

import pytest

from expertweave_ascend.cli import build_parser, main

FREE_TEXT = {"--name", "--host", "--base-name", "--device"}  # names and addresses: any text will do
ZERO_ALLOWED = {"--seed", "--atol", "--consolidate-rel-l2", "--host-adapter-bytes"}
NOT_NUMBERS = ["nan", "NaN", "inf", "-inf", "infinity", "1e400", "-1e400", "-1", "-0.5", "", " ", "ten", "infk",
               "1.5.3g", "12 gbx", "12 gb x", "k", "0x10", "9" * 5000]
BAD = {
    "count": NOT_NUMBERS + ["1.5", "1e3", "+1", " 1", "1_000", "99999999999999999999", "9" * 21],
    "size": NOT_NUMBERS + ["-1k", "257TiB", "99999999999999999999g", "1kk", "gib", "1.5.3", "12ib", "1e3k"],
    "_seconds": NOT_NUMBERS + ["86401", "1e9"],
    "_nonnegative": NOT_NUMBERS,
    "_spread": ["", "1", ":", "nan:1", "1:nan", "0:1", "1:0.1", "-1:1", "1:inf", "1e400:1e400", "1:2:3"],
    "_path": ["", "a\0b", "x" * 5000, "/" + "d/" * 2048],
    "_named_path": ["law", "=adapters/law", "law=", "law=a\0b", "law=" + "x" * 5000],
}
GOOD = {"count": "1", "size": "12GiB", "_seconds": "0.5", "_nonnegative": "0.5", "_spread": "0.001:1",
        "_path": "adapters/law", "_named_path": "law=adapters/law"}


def leaf_commands(parser, words=()):
    """(subcommand words, parser) for every subcommand that takes no further subcommand."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subparsers:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*words, name))
    if not subparsers:
        yield words, parser


def valued(parser):
    """The parser's arguments that take a value other than one of a fixed set of choices."""
    return [a for a in parser._actions if a.nargs != 0 and a.choices is None]


def kind(action) -> str | None:
    """The name of the cli type function checking the argument's value; None when no cli type does."""
    checker = action.type
    if checker is None or getattr(checker, "__module__", None) != "expertweave_ascend.cli":
        return None
    return checker.__name__


def label(action) -> str:
    """How argparse's error line names the argument."""
    return "/".join(action.option_strings) or action.metavar or action.dest


def unchecked(parser) -> list[str]:
    return [f"{' '.join(words)} {label(a)}" for words, sub in leaf_commands(parser) for a in valued(sub)
            if label(a) not in FREE_TEXT and kind(a) not in BAD]


def argv(words, sub, action, value) -> list[str]:
    """The subcommand with its required arguments given good values, and value for action."""
    out = list(words)
    for other in valued(sub):
        given = value if other is action else GOOD[kind(other)] if other.required else None
        if given is None:
            continue
        out += [given] if not other.option_strings else [f"{other.option_strings[0]}={given}"]
    return out


def cases(value_lists):
    parser = build_parser()
    for words, sub in leaf_commands(parser):
        for action in valued(sub):
            if label(action) not in FREE_TEXT:
                for value in value_lists(action):
                    yield parser, words, sub, action, value


def bad_values(action) -> list[str]:
    numeric = kind(action) in ("count", "size", "_seconds", "_nonnegative")
    return BAD[kind(action)] + (["0"] if numeric and label(action) not in ZERO_ALLOWED else [])


def quoted(value) -> str:
    """How the error line quotes the value: whole, or an over-long one cut short."""
    return repr(value) if len(value) <= 80 else f"... ({len(value)} characters)"


def test_every_valued_flag_has_a_checking_type():
    assert unchecked(build_parser()) == []
    found = {label(a) for _, sub in leaf_commands(build_parser()) for a in valued(sub)}
    assert {"--adapter-wait", "--host-adapter-bytes", "--kv-cache-memory", "--granularity", "--adapter-root",
            "--port", "--max-adapters", "--atol", "--delta-spread", "--expert-cfg", "base", "out"} <= found


def test_a_new_flag_without_a_checking_type_is_caught():
    parser = build_parser()
    serve = dict(leaf_commands(parser))[("serve",)]
    serve.add_argument("--new-count", type=int)
    serve.add_argument("--new-dir")
    assert unchecked(parser) == ["serve --new-count", "serve --new-dir"]


def test_bad_flag_values_are_one_error_line(capsys):
    failures, n = [], 0
    for parser, words, sub, action, value in cases(bad_values):
        n += 1
        line = argv(words, sub, action, value)
        try:
            parser.parse_args(line)
            code = None
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        errors = [text for text in err.splitlines() if ": error: " in text]
        prefix = f"expertweave {' '.join(words)}: error: argument {label(action)}: "
        if (code != 2 or "Traceback" in err or len(errors) != 1 or not errors[0].startswith(prefix)
                or quoted(value) not in errors[0]):
            failures.append((" ".join(line)[:200], code, err[-300:]))
    with capsys.disabled():
        print(f"\nCLI flag fuzz: {n} cases")
    assert n > 500 and not failures, failures[:5]


def test_good_flag_values_parse():
    n = 0
    for parser, words, sub, action, value in cases(lambda a: [GOOD[kind(a)]] + (["0"] * (label(a) in ZERO_ALLOWED))):
        parser.parse_args(argv(words, sub, action, value))
        n += 1
    assert n > 30


@pytest.mark.parametrize("flag, text, value", [
    ("--host-adapter-bytes", "12GiB", 12 << 30), ("--host-adapter-bytes", "512m", 512 << 20),
    ("--host-adapter-bytes", "1.5k", 1536), ("--host-adapter-bytes", "12 GB", 12 << 30),
    ("--host-adapter-bytes", "4096", 4096), ("--host-adapter-bytes", "0", 0),
    ("--host-adapter-bytes", "256TiB", 256 << 40), ("--adapter-wait", "0.5", 0.5), ("--adapter-wait", "86400", 86400),
    ("--port", "65535", 65535), ("--max-adapters", "4096", 4096), ("--consolidate-rel-l2", "0", 0.0),
])
def test_serve_flag_values_and_bounds(flag, text, value):
    args = build_parser().parse_args(["serve", "base", f"{flag}={text}"])
    assert getattr(args, flag[2:].replace("-", "_")) == value


def test_named_paths_and_sizes_reach_the_commands_parsed():
    args = build_parser().parse_args(["verify", "--base", "b", "--adapter", "law=a=b", "--kv-cache-memory", "64MiB",
                                      "--granularity", "64KiB"])
    assert args.adapter == [("law", "a=b")] and args.kv_cache_memory == 64 << 20 and args.granularity == 64 << 10


def test_a_name_too_long_for_the_system_is_its_one_error_line(capsys, tmp_path):
    long = str(tmp_path / ("x" * 300))
    assert main(["verify", "--base", "b", "--adapters-dir", long]) == 2
    assert capsys.readouterr().err == f"error: {long}: cannot be listed (File name too long)\n"
