"""Every shell example meant for the demo, in README.md and in docs/, runs against a service loaded with the demo's
data and answers what its page shows: the status code, and the JSON fields shown.

The convention, which docs/operate/index.md gives the writers of the pages:

- An example is a fenced block tagged `bash`, `sh` or `console` that runs `curl`. Every command of such a block is
  a `curl` to the demo's address, `localhost:8080` or `127.0.0.1:8080` (with `http://` or not), which may go on
  over lines ending in `\\` and pipe its answer into `jq`, `grep` or `head`; an `export NAME=value` for the
  commands after it; or a `sleep`. A `console` block writes its commands after a `$ ` prompt. A block that runs
  anything else (kubectl, psql, make) beside `curl` is refused: split it. A block for somewhere else than the demo
  (a cluster, tokens the demo does not have), or whose answers need a step no example makes (a change in a
  database), is tagged `shell`, and is not run.
- A command names no shell variable but `$API_TOKEN` (the demo's token, which has both roles) and those its block
  exports.
- The `#` lines right under a command, or a `#` comment at the end of its last line, show its answer (in a
  `console` block, the lines under it that have no prompt). First, if given, the status code: `# 404 {...}`, or
  `# 401` alone. Without one, the answer must be 2xx. Then JSON, checked field by field: only the fields shown are
  checked, `...` stands for anything (a value, the rest of an object or a list, any text inside a string), and a
  time stands for any time. Or lines of text (a metric, say), each of which must match a line of the output,
  `...` standing for any text.
- Each page runs from the top against a fresh copy of the demo's data, its examples in the order they are written:
  a page may pause and later resume, or retry an entry and then resolve it, as a reader who follows it on a fresh
  `make demo` would.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import demo
import tiers
from config import load_settings
from devkit import ROOT
from service import service_of
from tests.browser.conftest import Served, served  # noqa: F401 - the app over HTTP, as the browser tests serve it
from tests.world import World

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = {"bash", "sh", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<tag>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
DEMO_BASE = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8080")
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
EXPORT = re.compile(r"export\s+([A-Za-z_][A-Za-z0-9_]*)=")
SLEEP = re.compile(r"sleep [0-9.]+")  # a wait a reader makes anyway, such as the second /status takes to show a change
STATUS = re.compile(r"^\s*([1-5][0-9]{2})(?:\s+|$)")
GIVEN = {"API_TOKEN"}  # the variables the test sets
ANY = "..."  # what the shown answer writes for anything
TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")


@dataclass(frozen=True)
class Example:
    """One curl command of a page, and the answer its page shows."""

    page: str
    line: int
    command: str
    status: int | None  # None: any 2xx
    shown: str  # the answer shown, without the status; empty when none is
    exports: tuple[str, ...] = ()  # the export lines of its block that come before it

    def __str__(self) -> str:
        """Name the example as a reader finds it: page, line and its command's first line."""
        first = self.command.splitlines()[0].rstrip(" \\")
        return f"{self.page}:{self.line}: {first}"


@dataclass(frozen=True)
class Command:
    """A command of a block as the shell reads it: its lines joined, and the answer lines under it."""

    line: int
    text: str
    answer: list[str]


# Reading the pages


def blocks(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """Every fenced block of a page: the line its first line is on, its tag and its lines, unindented."""
    for found in FENCE.finditer(text):
        first = text.count("\n", 0, found.start("body")) + 1
        width = len(found["indent"])
        yield first, found["tag"], [line[width:] for line in found["body"].splitlines()]


def as_shell(tag: str, lines: list[str]) -> list[str]:
    """A console block written as a bash block: the prompt dropped, the output as # lines."""
    if tag != "console":
        return lines
    shell, in_command = [], False
    for line in lines:
        if line.startswith("$ ") or (in_command and line.strip()):
            shell.append(line.removeprefix("$ "))
            in_command = line.rstrip().endswith("\\")
        else:
            shell.append(f"# {line}" if line.strip() else line)
    return shell


def commands(first: int, lines: list[str]) -> list[Command]:
    """The commands of a block, each with the # lines right under it (a blank line ends them)."""
    found: list[Command] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip() or line.lstrip().startswith("#"):
            index += 1
            continue
        start, text = index, line
        while text.rstrip().endswith("\\") and index + 1 < len(lines):
            index += 1
            text = text.rstrip() + "\n" + lines[index]
        text, comment = split_comment(text)
        answer = [comment] if comment else []
        index += 1
        while index < len(lines) and lines[index].lstrip().startswith("#"):
            answer.append(lines[index].lstrip()[1:].removeprefix(" "))
            index += 1
        found.append(Command(first + start, text.strip(), answer))
    return found


def split_comment(text: str) -> tuple[str, str]:
    """A command without the comment at the end of its last line, and that comment."""
    quote = None
    for at, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and at > 0 and text[at - 1] in " \t":
            return text[:at].rstrip(), text[at + 1 :].strip()
    return text, ""


def page_examples(name: str, text: str) -> tuple[list[Example], list[str]]:
    """The examples of a page, in order, and what is wrong with any block that runs curl."""
    examples: list[Example] = []
    problems: list[str] = []
    for first, tag, lines in blocks(text):
        if tag not in SHELLS:
            continue
        found = commands(first, as_shell(tag, lines))
        if not any(command.text.startswith("curl ") for command in found):
            continue
        exports: list[str] = []
        for command in found:
            where = f"{name}:{command.line}: {command.text.splitlines()[0]}"
            if EXPORT.match(command.text):
                exports.append(command.text)
            elif SLEEP.fullmatch(command.text):
                examples.append(Example(name, command.line, command.text, None, "", tuple(exports)))
            elif not command.text.startswith("curl "):
                problems.append(f"{where}: a block that runs curl runs only curl (split it, or tag it shell)")
            else:
                problem = wrong_command(command.text, exports)
                if problem:
                    problems.append(f"{where}: {problem}")
                else:
                    examples.append(example(name, command, tuple(exports)))
    return examples, problems


def wrong_command(text: str, exports: list[str]) -> str | None:
    """Why a curl command cannot run against the demo, if it cannot."""
    known = GIVEN | {name for line in exports for name in EXPORT.findall(line)}
    unknown = sorted(set(VARIABLE.findall(text)) - known)
    if unknown:
        return f"names {', '.join('$' + name for name in unknown)}, which the demo does not set (or tag it shell)"
    if not DEMO_BASE.search(text):
        return "reaches no localhost:8080 (or tag it shell)"
    return None


def example(page: str, command: Command, exports: tuple[str, ...]) -> Example:
    """An example from a command and the answer lines under it."""
    shown = "\n".join(command.answer).strip()
    status = STATUS.match(shown)
    if status:
        shown = shown[status.end() :].strip()
    return Example(page, command.line, command.text, int(status[1]) if status else None, shown, exports)


EXAMPLES = {page: page_examples(page.relative_to(ROOT).as_posix(), page.read_text(encoding="utf-8")) for page in PAGES}
RUN = [page for page, (examples, problems) in EXAMPLES.items() if examples or problems]


# Reading what an example shows, and matching it


def shown_values(text: str) -> list[Any]:
    """The JSON values an answer shows, its `...` read as "anything"."""
    return json_stream(with_any(text))


def with_any(text: str) -> str:
    """JSON in which each `...` outside a string is a value "...", or a key "..." with that value in an object."""
    out: list[str] = []
    stack: list[str] = []
    at, quoted, last = 0, False, ""
    while at < len(text):
        char = text[at]
        if quoted:
            out.append(char)
            if char == "\\":
                out.append(text[at + 1 : at + 2])
                at += 1
            elif char == '"':
                quoted, last = False, '"'
        elif text.startswith(ANY, at):
            key = stack[-1:] == ["{"] and last in "{,"
            out.append(f'"{ANY}": "{ANY}"' if key else f'"{ANY}"')
            last, at = '"', at + len(ANY) - 1
        else:
            out.append(char)
            if char == '"':
                quoted = True
            elif char in "{[":
                stack.append(char)
            elif char in "}]" and stack:
                stack.pop()
            if not char.isspace():
                last = char
        at += 1
    return "".join(out)


def json_stream(text: str) -> list[Any]:
    """Every JSON value of a text, one after another (as jq writes them); ValueError if it holds anything else."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


def is_time(value: str) -> bool:
    """Whether a string is a time as the service writes one."""
    if not TIME.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def mismatches(shown: Any, actual: Any, path: str = "") -> list[str]:
    """Where an answer differs from what its page shows: only what is shown counts, `...` matches anything."""
    where = path or "the answer"
    if shown == ANY:
        return []
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{where} is {json.dumps(actual)}, not an object"]
        found = []
        for key, value in shown.items():
            inner = f"{path}.{key}" if path else key
            if key == ANY:
                continue
            if key not in actual:
                found.append(f"{inner} is missing")
            else:
                found += mismatches(value, actual[key], inner)
        return found
    if isinstance(shown, list):
        return list_mismatches(shown, actual, path)
    if isinstance(shown, str) and isinstance(actual, str) and text_matches(shown, actual):
        return []
    if same_number(shown, actual) or (shown == actual and type(shown) is type(actual)):
        return []
    return [f"{where} is {json.dumps(actual)}, not {json.dumps(shown)}"]


def same_number(shown: Any, actual: Any) -> bool:
    """Whether two values are the same number (5 and 5.0 are; true and 1 are not)."""
    numbers = all(isinstance(value, int | float) and not isinstance(value, bool) for value in (shown, actual))
    return numbers and shown == actual


def list_mismatches(shown: list[Any], actual: Any, path: str) -> list[str]:
    """Where a list differs: item by item, and as long, unless the shown list ends in `...`."""
    where = path or "the answer"
    if not isinstance(actual, list):
        return [f"{where} is {json.dumps(actual)}, not a list"]
    items, open_ended = (shown[:-1], True) if shown[-1:] == [ANY] else (shown, False)
    if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
        return [f"{where} has {len(actual)} items, not {len(items)}{' or more' if open_ended else ''}"]
    return [problem for n, item in enumerate(items) for problem in mismatches(item, actual[n], f"{path}[{n}]")]


def text_matches(shown: str, actual: str) -> bool:
    """Whether a string is the one shown: `...` in it stands for any text, and a time for any time."""
    if is_time(shown):
        return is_time(actual)
    pattern = ".*".join(re.escape(part) for part in shown.split(ANY))
    return re.fullmatch(pattern, actual, re.S) is not None


def answer_mismatches(shown: str, output: str) -> list[str]:
    """Where a command's output differs from the answer shown: JSON field by field, or text line by line."""
    if not shown:
        return []
    if shown[0] in '{["' or shown == ANY:
        try:
            expected = shown_values(shown)
        except ValueError as err:
            return [f"the answer shown is not JSON, `...` aside: {err}"]
        try:
            got = json_stream(output)
        except ValueError:
            return [f"the answer is not JSON: {output[:200]!r}"]
        if len(expected) == 1 and len(got) == 1:
            return mismatches(expected[0], got[0])
        return list_mismatches(expected, got, "")
    lines = output.splitlines()
    return [
        f"no line of the answer matches {line!r}"
        for line in shown.splitlines()
        if not any(text_matches(line.strip(), got.strip()) for got in lines)
    ]


# Running them


@dataclass(frozen=True)
class Answer:
    """What a command printed, the status of its request, and how the shell ended."""

    status: int | None
    output: str
    code: int
    errors: str


def run(example: Example, base: str, headers: Path) -> Answer:
    """Run an example's command with bash, at the served demo's address, with the demo token as $API_TOKEN."""
    command = example.command
    if command.startswith("curl "):  # the headers written to a file tell the status, whatever the command prints
        command = f"curl -D {shlex.quote(str(headers))} " + command.removeprefix("curl ")
    script = DEMO_BASE.sub(base, "\n".join([*example.exports, command]))
    headers.unlink(missing_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "API_TOKEN": demo.DEMO_TOKEN},
        check=False,
    )
    statuses = re.findall(r"^HTTP/\S+ (\d{3})", headers.read_text() if headers.exists() else "", re.M)
    output = done.stdout
    if output.startswith("HTTP/"):  # curl -i: the headers come first
        output = output.split("\r\n\r\n", 1)[-1]
    return Answer(int(statuses[-1]) if statuses else None, output, done.returncode, done.stderr)


def failures(example: Example, answer: Answer) -> list[str]:
    """What an example's answer does not show as its page says."""
    if SLEEP.fullmatch(example.command) and answer.code == 0:
        return []
    if answer.status is None or answer.code != 0:
        return [f"{example}: the command failed ({answer.code}): {answer.errors.strip()[:300]}"]
    if example.status is not None and answer.status != example.status:
        found = [f"status {answer.status}, not {example.status}"]
    elif example.status is None and not 200 <= answer.status < 300:
        found = [f"status {answer.status}, not 2xx"]
    else:
        found = answer_mismatches(example.shown, answer.output)
    return [f"{example}: {problem} (answered: {answer.output.strip()[:300]})" for problem in found]


@pytest.fixture
def settings(settings):
    """The test's settings, with the demo's token and the demo's polling interval, as the demo runs the service."""
    return replace(settings, api_token=demo.DEMO_TOKEN, api_tokens_file=None, polling_interval=5.0, trigger_wait=10.0)


def seed_the_demo_tiers(world: World) -> None:
    """Store the tier values the demo's first start stores (its TIERn_MV) in place of the template's defaults."""
    with world.portfolio, world.portfolio.cursor() as cur:
        cur.execute("DELETE FROM consistency.tier_value_history")
        cur.execute("DELETE FROM consistency.tier_values")
        tiers.seed(cur, load_settings(demo.DEMO_TIERS).tier_seed)


@pytest.fixture
def the_demo(served: Served, world: World) -> Served:  # noqa: F811 - the fixture imported above
    """The service with the demo's data and what the demo stages for the console, its poller and drift thread on."""
    seed_the_demo_tiers(world)  # before the first cycle reads them
    demo.load_sample(world.queue_uri, world.portfolio_uri)
    demo.stage_the_console(served.base, world.queue_uri, world.portfolio_uri)
    service_of(served.app).drift.run_due()  # the check the demo asked for, done before the page's first example
    service_of(served.app).start()
    return served


@pytest.mark.parametrize("page", RUN, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_example_of_a_page_answers_as_its_page_shows(page: Path, the_demo: Served, tmp_path: Path) -> None:
    examples, problems = EXAMPLES[page]
    found = list(problems)
    for each in examples:
        found += failures(each, run(each, the_demo.base, tmp_path / "headers"))
    assert found == [], "\n".join(found)


def demo_guide() -> tuple[list[Example], list[str]]:
    """The commands `make demo` prints for a newcomer, read as a page's bash block."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        demo.print_try_these("http://127.0.0.1:8080")
    lines = [line.strip() for line in printed.getvalue().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("export API_TOKEN="))
    end = lines.index("", start)
    return page_examples("the demo's guide", "```bash\n" + "\n".join(lines[start:end]) + "\n```\n")


def test_the_commands_the_demo_prints_work_on_its_data(the_demo: Served, tmp_path: Path) -> None:
    examples, problems = demo_guide()
    assert problems == [] and len(examples) == 5
    found = [problem for each in examples for problem in failures(each, run(each, the_demo.base, tmp_path / "h"))]
    assert found == [], "\n".join(found)


def test_the_pages_hold_examples_to_run() -> None:
    assert sum(len(examples) for examples, _ in EXAMPLES.values()) >= 20


BLOCK = """\
Text.

```bash
export QUEUE=withdrawal
curl -s -X POST -H "Authorization: Bearer $API_TOKEN" \\
     localhost:8080/api/v1/consistency/parked/$QUEUE/4/retry
# 200 {"entry": {"queue": "withdrawal", "queue_id": 4, ...},
#      "cycle": {...}}

# a comment, not an answer
curl -s -o /dev/null -w '%{http_code}' localhost:8080/api/v1/consistency/parked   # 401
```

```console
$ curl -s localhost:8080/metrics | grep '^consistency_paused '
consistency_paused 0.0
```

```shell
curl -s -H "Authorization: Bearer $OLD_TOKEN" cluster:8080/api/v1/consistency/parked
```
"""


def test_a_page_is_read_into_commands_with_the_answers_they_show() -> None:
    examples, problems = page_examples("docs/a-page.md", BLOCK)
    assert problems == []
    assert [(e.line, e.status, e.shown) for e in examples] == [
        (5, 200, '{"entry": {"queue": "withdrawal", "queue_id": 4, ...},\n     "cycle": {...}}'),
        (11, 401, ""),
        (15, None, "consistency_paused 0.0"),
    ]
    assert [e.exports for e in examples] == [("export QUEUE=withdrawal",)] * 2 + [()]
    assert shown_values(examples[0].shown) == [
        {"entry": {"queue": "withdrawal", "queue_id": 4, ANY: ANY}, "cycle": {ANY: ANY}}
    ]


def test_a_block_for_the_demo_runs_only_curl_and_names_only_the_token() -> None:
    text = (
        "```bash\nkubectl get pods\ncurl -s localhost:8080/health\n```\n\n"
        '```bash\ncurl -s -H "Authorization: Bearer $READ_TOKEN" localhost:8080/api/v1/consistency/parked\n```\n\n'
        "```bash\ncurl -s https://prometheus.example/api/v1/query\n```\n\n```shell\ncurl -s $ANY\n```\n"
    )
    examples, problems = page_examples("page.md", text)
    assert [e.line for e in examples] == [3]
    assert [problem.split(": ")[-1] for problem in problems] == [
        "a block that runs curl runs only curl (split it, or tag it shell)",
        "names $READ_TOKEN, which the demo does not set (or tag it shell)",
        "reaches no localhost:8080 (or tag it shell)",
    ]


@pytest.mark.parametrize(
    ("shown", "actual", "problems"),
    [
        ('{"count": 1, "entries": [...]}', {"count": 1, "entries": [1, 2], "more": False}, []),
        ('{"count": 2, ...}', {"count": 1}, ["count is 1, not 2"]),
        ('{"paused_at": "2026-12-01T22:10:04.5+00:00"}', {"paused_at": "2027-01-02T03:04:05Z"}, []),
        ('{"paused_at": "2026-12-01T22:10:04.5+00:00"}', {"paused_at": "soon"}, [
            'paused_at is "soon", not "2026-12-01T22:10:04.5+00:00"']),
        ('{"reason": "no portfolio for account ..."}', {"reason": "no portfolio for account 1099999999"}, []),
        ('{"entries": [{"queue_id": 4}]}', {"entries": [{"queue_id": 4}, {"queue_id": 5}]}, [
            "entries has 2 items, not 1"]),
        ('{"entries": [{"queue_id": 4}, ...]}', {"entries": []}, ["entries has 0 items, not 1 or more"]),
        ('{"state": "applied"}', {"error": "not parked"}, ["state is missing"]),
        ('{"more": false}', {"more": 0}, ["more is 0, not false"]),
        ('{"polling_interval": 5}', {"polling_interval": 5.0}, []),
        ('{"a": 1}\n{"a": 2}', [{"a": 1}, {"a": 2}], []),
    ],
)  # fmt: skip
def test_an_answer_matches_only_if_every_field_shown_is_as_shown(shown: str, actual: Any, problems: list[str]) -> None:
    output = "\n".join(json.dumps(value) for value in (actual if isinstance(actual, list) else [actual]))
    assert answer_mismatches(shown, output) == problems


def test_text_shown_matches_a_line_of_the_output() -> None:
    output = 'consistency_paused 0.0\nconsistency_cycles_total{result="ok"} 3.0\n'
    assert answer_mismatches('consistency_cycles_total{result="ok"} ...', output) == []
    assert answer_mismatches("consistency_paused 1.0", output) == [
        "no line of the answer matches 'consistency_paused 1.0'"
    ]
