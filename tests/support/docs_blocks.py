"""The runnable blocks of the documentation: found, checked and prepared for a run.

``tests/docs/test_docs_commands.py`` runs every ```sh and ```python block of README.md and
docs/*.md against a started appliance. This module holds what that needs without a server:
parsing a page into blocks, the rules a block must follow, the ports substituted, and the bash
wrapper a sh block runs in. The rules, as a writer of the docs meets them:

- A block is skipped only when the line right before its opening fence says why, with one of
  ``SKIP_REASONS``: ``<!-- docs-test: skip needs-systemd -->``. Any other ``docs-test:``
  comment, a marker not followed by a block, or a marker before a block that is never run is
  an error.
- Fences say ``sh`` or ``python``; ``bash``, ``shell``, ``console``, ``py`` and the like are
  refused (a block in them would escape the test). Blocks in other languages (``toml``, none)
  are not run.
- Every ``curl`` in a sh block carries ``--fail-with-body`` (counted: as many flags as curl
  commands), unless the block has ``# expect: NNN`` lines: there an error status is the point,
  and the statuses of 400 and above that its curl calls got must be those lines', in order.
  curl in such a block must not set ``-w`` itself (the wrapper records the status with it).
- Ports: ``localhost:8000``, ``127.0.0.1:8000`` and ``--port 8000`` become the started
  appliance's port; any other port written after ``localhost:``, ``127.0.0.1:`` or ``--port``
  becomes a free port, the same one everywhere in a run (``--port 0`` stays).

It also lists the warnings and errors the code logs (``log_messages``), which
docs/troubleshooting.md must explain, each in a row that quotes its words.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SKIP_REASONS = {
    "runs-forever": "a server in the foreground, stopped with Ctrl-C (the test starts its own)",
    "is-the-suite": "runs this test suite itself",
    "needs-systemd": "needs systemd and root (units, systemctl, journalctl)",
    "changes-host": "changes the machine: users, /etc, firewall, installed packages",
    "needs-gpu": "needs an NVIDIA GPU with onnxruntime-gpu",
    "needs-several-hosts": "needs several hosts (a multi-host harness runs these later)",
}
RUN_LANGUAGES = ("sh", "python")
REFUSED_LANGUAGES = (
    "bash",
    "shell",
    "console",
    "shell-session",
    "sh-session",
    "zsh",
    "py",
    "python3",
    "pycon",
)
MAIN_PORT = 8000  # what the docs write for the appliance they talk to

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_EXPECT = re.compile(r"^\s*#\s*expect:\s*(?P<status>[1-5][0-9][0-9])\s*$")
_HEREDOC = re.compile(
    r"<<(?P<dash>-?)\s*(?P<quote>['\"]?)(?P<word>[A-Za-z_][A-Za-z0-9_]*)(?P=quote)"
)
_PORT = re.compile(r"(?P<head>(?:localhost|127\.0\.0\.1):|--port[ =])(?P<port>[0-9]{2,5})\b")


class DocsBlockError(ValueError):
    """A page breaks one of the rules above; the message names the page and line."""


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root, e.g. docs/api.md
    line: int  # line of the opening fence, from 1
    language: str
    text: str  # the content, without the fence's indentation
    skip: str | None = None  # a reason from SKIP_REASONS
    expects: tuple[int, ...] = field(default=())

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.skip is None

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse_page(text: str, page: str) -> list[Block]:
    """Every fenced block of a page, with its skip reason and expected statuses; the run
    languages' blocks checked against the rules (DocsBlockError naming page and line)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str] | None = None  # a marker's line and reason, awaiting its fence
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if pending is not None and fence is None:
            raise DocsBlockError(
                f"{page}:{pending[0]}: a docs-test marker must be the line right before a "
                "block's opening fence"
            )
        if marker is not None:
            pending = (number, _skip_reason(marker.group("body"), page, number))
        elif "docs-test" in line and "<!--" in line:
            raise DocsBlockError(f"{page}:{number}: malformed docs-test marker {line.strip()!r}")
        elif fence is not None:
            indent = fence.group("indent")
            info = fence.group("info").strip()
            language = info.split()[0] if info else ""
            body: list[str] = []
            index += 1
            while index < len(lines) and lines[index].strip() != "```":
                content = lines[index]
                body.append(content[len(indent) :] if content.startswith(indent) else content)
                index += 1
            if index == len(lines):
                raise DocsBlockError(f"{page}:{number}: the block opened here is never closed")
            skip = pending[1] if pending is not None else None
            block = Block(page, number, language, "\n".join(body) + "\n", skip)
            blocks.append(_checked(block))
            pending = None
        index += 1
    if pending is not None:
        raise DocsBlockError(f"{page}:{pending[0]}: a docs-test marker at the end of the page")
    return blocks


def _skip_reason(body: str, page: str, number: int) -> str:
    words = body.split()
    if len(words) != 2 or words[0] != "skip":
        raise DocsBlockError(
            f"{page}:{number}: docs-test marker {body!r}: accepted `skip REASON` only"
        )
    if words[1] not in SKIP_REASONS:
        raise DocsBlockError(
            f"{page}:{number}: skip reason {words[1]!r} is not accepted; accepted: "
            + ", ".join(SKIP_REASONS)
        )
    return words[1]


def _checked(block: Block) -> Block:
    if block.language in REFUSED_LANGUAGES:
        raise DocsBlockError(
            f"{block.where}: a ```{block.language} block; write ```sh or ```python so that it "
            "is run by tests/docs"
        )
    if block.language not in RUN_LANGUAGES:
        if block.skip is not None:
            raise DocsBlockError(
                f"{block.where}: a skip marker on a ```{block.language or '(plain)'} block, "
                "which is never run"
            )
        return block
    expects = tuple(
        int(m.group("status")) for ln in block.text.splitlines() if (m := _EXPECT.match(ln))
    )
    if expects and block.language != "sh":
        raise DocsBlockError(f"{block.where}: `# expect:` lines belong in ```sh blocks only")
    if block.language == "sh" and not expects:
        calls, flags = curl_counts(block.text)
        if calls != flags:
            raise DocsBlockError(
                f"{block.where}: {calls} curl command(s) but {flags} --fail-with-body; every "
                "curl needs it (or say `# expect: NNN` where an error status is the point)"
            )
    return Block(block.page, block.line, block.language, block.text, block.skip, expects)


def without_heredocs(text: str) -> str:
    """The script with the bodies of its here-documents removed (they are data, not commands)."""
    out: list[str] = []
    ending: tuple[str, bool] | None = None
    for line in text.splitlines():
        if ending is not None:
            word, dash = ending
            if (line.lstrip("\t") if dash else line) == word:
                ending = None
            continue
        out.append(line)
        found = _HEREDOC.search(line)
        if found is not None:
            ending = (found.group("word"), bool(found.group("dash")))
    return "\n".join(out) + "\n"


def curl_counts(script: str) -> tuple[int, int]:
    """(curl commands, --fail-with-body flags) in a sh script, comments and quoted text aside."""
    text = without_heredocs(script)
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: count words instead
        tokens = re.findall(r"[^\s|;&()]+", re.sub(r"(?m)^\s*#.*$", "", text))
    calls = sum(1 for t in tokens if t == "curl" or t.endswith("/curl"))
    return calls, tokens.count("--fail-with-body")


def page_blocks(root: Path, pages: list[str]) -> list[Block]:
    blocks: list[Block] = []
    for page in pages:
        blocks += parse_page((root / page).read_text(encoding="utf-8"), page)
    return blocks


def documentation_pages(root: Path) -> list[str]:
    """README.md, then docs/*.md by name: the order the pages run in."""
    return ["README.md", *sorted(f"docs/{p.name}" for p in (root / "docs").glob("*.md"))]


def substitute_ports(text: str, port_for: Callable[[int], int]) -> str:
    """The block with every documented port replaced by ``port_for(port)`` (0 stays 0)."""

    def swap(match: re.Match[str]) -> str:
        port = int(match.group("port"))
        return match.group("head") + str(port_for(port) if port else 0)

    return _PORT.sub(swap, text)


STATUS_MARK = "__docs_test_http_status"

# Sourced before every sh block. curl records the status of each call (write-out on its
# stderr, split off into the status log); the block's variables and working folder are saved
# at exit for the page's next block (bash's own and read-only variables aside).
SH_PRELUDE = r"""
curl() {
  { command curl --write-out '%{stderr}\n__docs_test_http_status %{http_code}\n' "$@" \
      2>&1 1>&3 3>&- |
    awk -v out="$__docs_test_statuses" '
      match($0, /__docs_test_http_status [0-9]+/) {
        print substr($0, RSTART, RLENGTH) >> out; fflush(out)
        rest = substr($0, 1, RSTART - 1); if (rest != "") print rest > "/dev/stderr"; next
      }
      $0 != "" { print > "/dev/stderr" }'
  } 3>&1
}
__docs_test_save() {
  local __docs_test_name __docs_test_decl
  {
    for __docs_test_name in $(compgen -v); do
      case "$__docs_test_name" in
        __docs_test_*|BASH*|COMP_*|_|PWD|OLDPWD|SHLVL|PIPESTATUS|FUNCNAME|LINENO|RANDOM) continue ;;
        SRANDOM|SECONDS|EPOCHREALTIME|EPOCHSECONDS|HISTCMD|OPTIND|OPTERR|OPTARG|REPLY) continue ;;
        COLUMNS|LINES|GROUPS|DIRSTACK|PPID|UID|EUID|SHELLOPTS|IFS|PS1|PS2|PS4) continue ;;
      esac
      __docs_test_decl=$(declare -p "$__docs_test_name" 2>/dev/null) || continue
      [[ "$__docs_test_decl" =~ ^declare\ -[a-zA-Z]*r ]] && continue
      printf '%s\n' "$__docs_test_decl"
    done
    printf 'cd -- %q\n' "$PWD"
  } > "$__docs_test_state_out"
}
if [ -f "$__docs_test_state_in" ]; then source "$__docs_test_state_in"; fi
trap __docs_test_save EXIT
"""


def sh_script(block_text: str, state_in: Path, state_out: Path, statuses: Path) -> str:
    """What ``bash -e -o pipefail`` runs for one sh block."""
    head = (
        f"__docs_test_state_in={shlex.quote(str(state_in))}\n"
        f"__docs_test_state_out={shlex.quote(str(state_out))}\n"
        f"__docs_test_statuses={shlex.quote(str(statuses))}\n"
    )
    return head + SH_PRELUDE + "# --- the block ---\n" + block_text


def python_launcher(state_in: Path, python: str, script: Path) -> str:
    """A python block runs in the page's folder with the variables its sh blocks exported."""
    return (
        f"if [ -f {shlex.quote(str(state_in))} ]; then source {shlex.quote(str(state_in))}; fi\n"
        f"exec {shlex.quote(python)} {shlex.quote(str(script))}\n"
    )


def recorded_statuses(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [
        int(line.split()[1])
        for line in path.read_text().splitlines()
        if line.startswith(STATUS_MARK) and len(line.split()) == 2
    ]


def expectation_failure(block: Block, statuses: list[int]) -> str | None:
    """Why an expect block's statuses are wrong, or None: its errors (>= 400) must be exactly
    the statuses its ``# expect:`` lines name, in order."""
    if not block.expects:
        return None
    errors = [s for s in statuses if s >= 400]
    if errors != list(block.expects):
        return (
            f"expected error statuses {list(block.expects)}, the block's curl calls got "
            f"{statuses} (errors {errors})"
        )
    return None


# -- the log messages docs/troubleshooting.md must explain ---------------------------------

LOG_LEVELS = ("warning", "error", "exception", "critical")
LOGGERS = ("log", "logger")  # the names modules give their logging.Logger
SERIES_METHODS = ("failed", "say")  # Retry and _FailureSeries: they log what they are given
_PLACEHOLDER = re.compile(r"%[-+ #0-9.]*[sdifrx%]")


@dataclass(frozen=True)
class LogMessage:
    where: str  # path:line
    level: str
    text: str  # the literal text, with {} where a value goes

    @property
    def explainable(self) -> bool:
        """Whether the message has words of its own (not only values, as ``"{}: {}"``)."""
        return any(c.isalpha() for c in self.text.replace("{}", ""))

    def pattern(self) -> re.Pattern[str]:
        """Matches the message as a page writes it: its words, any placeholder for values."""
        return re.compile(".+?".join(re.escape(part) for part in self.text.split("{}")))


def log_messages(root: Path, folders: tuple[str, ...]) -> list[LogMessage]:
    """Every warning and error the code logs (``log.warning(...)``, ``logger.error(...)``, and
    what a failure series logs), as literal text."""
    import ast

    found: list[LogMessage] = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner, method = node.func.value, node.func.attr
                if method in LOG_LEVELS and isinstance(owner, ast.Name) and owner.id in LOGGERS:
                    level, candidates = method, node.args[:1]
                elif method in SERIES_METHODS:
                    level, candidates = "warning", node.args[:2]
                else:
                    continue
                for arg in candidates:
                    text = _literal(arg)
                    if text is not None and text.strip("{} ") and text != "{}":
                        where = f"{path.relative_to(root)}:{node.lineno}"
                        found.append(LogMessage(where, level, text))
                        break
    return found


def _literal(node: object) -> str | None:
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _PLACEHOLDER.sub("{}", node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "{}"
            for v in node.values
        )
    return None
