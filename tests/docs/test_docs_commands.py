"""Docs that cannot rot: every ```sh and ```python block of README.md and docs/*.md is run, in
order, against a started appliance.

Writing a block (the rules in full: ``tests/support/docs_blocks.py``):

- Fence it ```sh or ```python (```bash, ```console, ```py ... are refused); other languages
  (```toml, none) are not run. Write ``localhost:8000`` for the appliance.
- Every ``curl`` carries ``--fail-with-body``, unless an error status is the point: then the
  block says so with one ``# expect: 401`` line (any status) per error, in order, and its curl
  calls must get exactly those errors.
- A block that cannot run here gets, on the line right before its fence, one of the reasons of
  ``SKIP_REASONS``: ``<!-- docs-test: skip needs-systemd -->`` (runs-forever, is-the-suite,
  needs-systemd, changes-host, needs-gpu, needs-several-hosts); any other reason is refused.

How a run goes:

- One ``appliance serve`` is started for the whole run, on a free port, over a repository that
  holds the demo model (``exporter.demo_model.ensure_demo_package``): what the docs call
  ``appliance serve --model-repo models`` on port 8000. ``localhost:8000`` in a block becomes
  its port; other ports a block writes (a second appliance it starts itself) become free ports.
- Pages run in order (README.md, then docs/*.md by name), each in a folder of its own whose
  ``models`` is that repository, so a page that exports or moves a model version changes what
  the appliance serves, as it would for a reader; a page leaves the appliance serving the demo.
- A page's blocks run in order, each in its own ``bash -e -o pipefail`` (a python block: the
  venv's python, with the variables its page exported), with the page's shell state carried
  from one block to the next as if typed into one terminal: the variables a block sets and the
  folder it ends in. Functions do not carry. A block's exit status decides; after a failure the
  page's later blocks are not run (they depend on it). Processes a block leaves running are
  stopped when its page ends.
- At least ``MIN_BLOCKS_RUN`` blocks must run. Apart from the run, docs/troubleshooting.md must
  explain every warning and error the code logs (``log_messages``).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.docs_blocks import (
    MAIN_PORT,
    SKIP_REASONS,
    Block,
    DocsBlockError,
    curl_counts,
    documentation_pages,
    expectation_failure,
    log_messages,
    page_blocks,
    parse_page,
    python_launcher,
    recorded_statuses,
    sh_script,
    substitute_ports,
    without_heredocs,
)
from tests.support.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
PAGES = documentation_pages(ROOT)
CODE_FOLDERS = ("appliance", "runtime", "cache", "exporter")
MIN_BLOCKS_RUN = 20
APPLIANCE = (sys.executable, "-m", "appliance.cli")
TOOLS = ("bash", "curl", "openssl", "awk", "gzip", "sed", "grep")  # what the blocks use
BLOCK_TIMEOUT_S = 240.0
START_TIMEOUT_S = 180.0


# -- the rules, without a server ------------------------------------------------------------


def test_every_page_follows_the_block_rules() -> None:
    blocks = page_blocks(ROOT, PAGES)
    assert any(b.runs for b in blocks)


def test_a_skip_needs_a_known_reason() -> None:
    page = "<!-- docs-test: skip needs-systemd -->\n```sh\nsystemctl status\n```\n"
    assert parse_page(page, "p.md")[0].skip == "needs-systemd"
    for marker in ("skip too-slow", "skip", "run", "skip needs-gpu extra"):
        with pytest.raises(DocsBlockError, match="p.md:1"):
            parse_page(f"<!-- docs-test: {marker} -->\n```sh\ntrue\n```\n", "p.md")
    with pytest.raises(DocsBlockError, match="malformed"):
        parse_page("<!-- docs-test skip needs-gpu -->\n```sh\ntrue\n```\n", "p.md")


def test_a_marker_must_be_right_before_a_run_block() -> None:
    with pytest.raises(DocsBlockError, match="right before"):
        parse_page("<!-- docs-test: skip needs-gpu -->\n\n```sh\ntrue\n```\n", "p.md")
    with pytest.raises(DocsBlockError, match="never run"):
        parse_page("<!-- docs-test: skip needs-gpu -->\n```toml\na = 1\n```\n", "p.md")
    with pytest.raises(DocsBlockError, match="end of the page"):
        parse_page("text\n<!-- docs-test: skip needs-gpu -->\n", "p.md")


def test_other_shell_and_python_fences_are_refused() -> None:
    for language in ("bash", "console", "py", "python3"):
        with pytest.raises(DocsBlockError, match="write ```sh or ```python"):
            parse_page(f"```{language}\ntrue\n```\n", "p.md")
    assert not parse_page("```toml\nport = 8000\n```\n", "p.md")[0].runs


def test_every_curl_needs_fail_with_body_unless_an_error_is_expected() -> None:
    with pytest.raises(DocsBlockError, match="1 curl command"):
        parse_page("```sh\ncurl -s localhost:8000/v2\n```\n", "p.md")
    ok = "```sh\nX=$(curl -s --fail-with-body a | python -c 'print(1) # curl') # curl b\n```\n"
    assert parse_page(ok, "p.md")[0].runs
    expecting = parse_page("```sh\n# expect: 401\ncurl -s a\n# expect: 403\ncurl b\n```\n", "p")
    assert expecting[0].expects == (401, 403)
    assert curl_counts("cat <<'EOF'\ncurl x\nEOF\ncurl --fail-with-body y\n") == (1, 1)
    assert without_heredocs("a <<-END\n\tcurl\n\tEND\nb\n") == "a <<-END\nb\n"


def test_expected_statuses_are_the_errors_in_order() -> None:
    block = Block("p.md", 1, "sh", "", None, (401, 403))
    assert expectation_failure(block, [200, 401, 200, 403]) is None
    assert expectation_failure(block, [401]) is not None
    assert expectation_failure(block, [403, 401]) is not None
    assert expectation_failure(block, [401, 403, 503]) is not None


def test_ports_are_substituted() -> None:
    ports = {8000: 41000, 8443: 42000}
    text = "curl localhost:8000/v2 https://127.0.0.1:8443/x --port 8443 --port 0 host:8000"
    assert substitute_ports(text, ports.__getitem__) == (
        "curl localhost:41000/v2 https://127.0.0.1:42000/x --port 42000 --port 0 host:8000"
    )


def test_carried_shell_state_and_recorded_statuses(tmp_path: Path) -> None:
    """The bash side: variables and the folder carry to the next block, curl statuses are
    recorded, the block's exit status is kept."""
    state = [tmp_path / "s0", tmp_path / "s1", tmp_path / "s2"]
    statuses = tmp_path / "statuses"
    first = 'X="two words"; export Y=3; mkdir -p sub; cd sub\ncurl -so /dev/null file:///dev/null\n'
    second = 'test "$X" = "two words"\ntest "$Y" = 3\ntest "$(basename "$PWD")" = sub\nexit 7\n'
    for index, text in enumerate((first, second)):
        script = tmp_path / f"{index}.sh"
        script.write_text(sh_script(text, state[index], state[index + 1], statuses))
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", str(script)], cwd=tmp_path, capture_output=True
        )
        assert result.returncode == 7 * index, result.stderr  # the second ends in exit 7
    assert recorded_statuses(statuses) == [0]


# -- the run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    block: Block
    status: str  # ran | skipped | failed | not-run
    why: str = ""
    seconds: float = 0.0
    output: str = ""


class Ports:
    """8000 is the started appliance; any other documented port gets a free one, once."""

    def __init__(self, main: int) -> None:
        self.map = {MAIN_PORT: main}

    def __call__(self, port: int) -> int:
        if port not in self.map:
            self.map[port] = free_port()
        return self.map[port]


def _environment(tmp: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),
        VIRTUAL_ENV=str(Path(venv_bin).parent),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        XDG_CACHE_HOME=str(tmp / "xdg-cache"),
        PYTHONUNBUFFERED="1",
    )
    return env


@contextlib.contextmanager
def _appliance(tmp: Path, env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """``appliance serve --model-repo models`` on a free port; yields its URL and its log."""
    from exporter.demo_model import ensure_demo_package
    from tests.support.smollm2 import smollm2_repo

    repo, state = tmp / "models", str(tmp / "state")
    ensure_demo_package(repo)
    # the LLM of the demo, exported once per test process (the exporter's test checks it)
    (repo / "smollm2").symlink_to(smollm2_repo() / "smollm2")
    log = tmp / "appliance.log"
    with open(log, "w") as errors:
        process = subprocess.Popen(
            [*APPLIANCE, "serve", "--port", "0", "--model-repo", str(repo), "--state-dir", state],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
    try:
        assert process.stdout is not None
        if not select.select([process.stdout], [], [], START_TIMEOUT_S)[0]:
            raise AssertionError(
                f"appliance serve silent for {START_TIMEOUT_S:.0f} s\n{log.read_text()}"
            )
        line = process.stdout.readline()  # printed once the demo is placed and warm
        match = re.search(r"https?://\S+", line)
        if match is None:
            raise AssertionError(f"appliance serve did not start: {line!r}\n{log.read_text()}")
        yield match.group(0), log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stop_groups(groups: list[int]) -> None:
    """Stop what a page's blocks left running (each block leads its own process group)."""
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + 30
    for pgid in groups:
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


def _run_block(
    block: Block, index: int, page_dir: Path, run_dir: Path, state: Path, env: dict[str, str],
    ports: Ports, groups: list[int],
) -> tuple[Outcome, Path]:  # fmt: skip
    text = substitute_ports(block.text, ports)
    statuses = run_dir / f"{index}.statuses"
    if block.language == "sh":
        next_state = run_dir / f"{index}.state"
        script = run_dir / f"{index}.sh"
        script.write_text(sh_script(text, state, next_state, statuses))
    else:
        next_state = state
        source = run_dir / f"{index}.py"
        source.write_text(text)
        script = run_dir / f"{index}-python.sh"
        script.write_text(python_launcher(state, sys.executable, source))
    output = run_dir / f"{index}.out"
    started = time.monotonic()
    with open(output, "w") as out:
        process = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", str(script)],
            cwd=page_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        groups.append(process.pid)
        try:
            code: int | None = process.wait(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    seconds = time.monotonic() - started
    shown = output.read_text(errors="replace")
    if code is None:
        why = f"still running after {BLOCK_TIMEOUT_S:.0f} s"
    elif code != 0:
        why = f"exit status {code}"
    else:
        why = expectation_failure(block, recorded_statuses(statuses)) or ""
    status = "failed" if why else "ran"
    return Outcome(block, status, why, seconds, shown), next_state


def _run_page(
    page: str, blocks: list[Block], tmp: Path, env: dict[str, str], ports: Ports
) -> list[Outcome]:
    slug = page.replace("/", "-").removesuffix(".md")
    page_dir, run_dir = tmp / "pages" / slug, tmp / "runs" / slug
    page_dir.mkdir(parents=True)
    run_dir.mkdir(parents=True)
    (page_dir / "models").symlink_to(tmp / "models", target_is_directory=True)
    outcomes: list[Outcome] = []
    state = run_dir / "initial.state"  # absent: the first block starts from nothing
    groups: list[int] = []
    failed = False
    try:
        for index, block in enumerate(b for b in blocks if b.language in ("sh", "python")):
            if block.skip is not None:
                outcomes.append(Outcome(block, "skipped", block.skip))
            elif failed:
                outcomes.append(Outcome(block, "not-run", "an earlier block of the page failed"))
            else:
                outcome, state = _run_block(
                    block, index, page_dir, run_dir, state, env, ports, groups
                )
                outcomes.append(outcome)
                failed = outcome.status == "failed"
    finally:
        _stop_groups(groups)
    return outcomes


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Outcome]]:
    """Every page's blocks run once, in order, against one appliance (the page tests read it)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:  # a failure, not a skip: the docs would go untested
        pytest.fail(f"the documentation's commands need {', '.join(missing)} on PATH")
    tmp = tmp_path_factory.mktemp("docs")
    env = _environment(tmp)
    blocks = page_blocks(ROOT, PAGES)
    results: dict[str, list[Outcome]] = {}
    with _appliance(tmp, env) as (url, log):
        ports = Ports(int(url.rsplit(":", 1)[1]))
        for page in PAGES:
            results[page] = _run_page(page, [b for b in blocks if b.page == page], tmp, env, ports)
        report = [
            f"{o.block.where:<28} {o.status:<8} {o.seconds:6.1f}s  {o.block.first_line[:60]}"
            + (f"  ({o.why})" if o.why else "")
            for outcomes in results.values()
            for o in outcomes
        ]
        (tmp / "blocks.txt").write_text("\n".join(report) + "\n")
        print("\n" + "\n".join(report))
        if any(o.status == "failed" for outcomes in results.values() for o in outcomes):
            print("--- appliance log (last 4000 characters) ---\n" + log.read_text()[-4000:])
    return results


# The first of these tests pays for the module's fixture: SmolLM2 exported (unless an earlier
# test of this process did), `appliance serve` started, every page's blocks run: 4.5-5.5 min on
# 2 busy cores, so the limit is well above that.
FIXTURE_TIMEOUT_S = 900


@pytest.mark.slow
@pytest.mark.timeout(FIXTURE_TIMEOUT_S)
@pytest.mark.parametrize("page", PAGES)
def test_page_blocks_run(page: str, docs_run: dict[str, list[Outcome]]) -> None:
    failures = [o for o in docs_run[page] if o.status == "failed"]
    assert not failures, "\n\n".join(
        f"{o.block.where} failed ({o.why}) after {o.seconds:.1f} s:\n{o.block.text}\n"
        f"--- its output (last 3000 characters) ---\n{o.output[-3000:]}"
        for o in failures
    )


@pytest.mark.slow
@pytest.mark.timeout(FIXTURE_TIMEOUT_S)
def test_at_least_20_blocks_ran(docs_run: dict[str, list[Outcome]]) -> None:
    outcomes = [o for page in docs_run.values() for o in page]
    ran = [o for o in outcomes if o.status == "ran"]
    assert all(o.why in SKIP_REASONS for o in outcomes if o.status == "skipped")
    assert len(ran) >= MIN_BLOCKS_RUN, f"only {len(ran)} blocks ran; at least {MIN_BLOCKS_RUN}"


def test_troubleshooting_explains_every_logged_warning_and_error() -> None:
    """Every warning and error the code logs has its row in docs/troubleshooting.md (its words,
    with any placeholder where the message has a value)."""
    lines = (ROOT / "docs" / "troubleshooting.md").read_text().replace("`", "").splitlines()
    messages = [m for m in log_messages(ROOT, CODE_FOLDERS) if m.explainable]
    assert len(messages) > 20
    missing = [m for m in messages if not any(m.pattern().search(line) for line in lines)]
    assert not missing, "docs/troubleshooting.md does not explain:\n" + "\n".join(
        f"  {m.where} ({m.level}): {m.text}" for m in missing
    )
