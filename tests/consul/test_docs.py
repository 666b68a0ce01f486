"""Every Python block of README.md and docs/*.md runs as written.

The convention (docs/index.md, "Docs that run"): an HTML comment on the line before
a block, ``<!-- doc-test: WORDS -->``, says how it runs. Unmarked: alone, in a fresh
namespace. ``continues``: in the namespace the page's previous block left.
``consul``: the page needs a real Consul agent; ``127.0.0.1:8500`` in its blocks
means the test's agent. ``serves``: the block serves until stopped; it runs in a
thread, the page's next blocks run while it serves, and ``served.stop()`` ends it at
the page's end. ``fragment``: not run (part of a larger program; the comment says
why). At a page's end every backend it left open is closed and anything it left in
the agent is deregistered.

It lives with the Consul tests because some pages need the session's agent.
"""

from __future__ import annotations

import json
import re
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import discovery_core as dc

ROOT = Path(__file__).parent.parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<words>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
_EXAMPLE_AGENT = "127.0.0.1:8500"
_SERVING_WITHIN = 20.0
# Pages that fail today for a reason another change fixes: strict, so the marker must
# go once it passes.
_PENDING: dict[str, pytest.MarkDecorator] = {}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    words: frozenset[str]

    def source(self, agent: str | None) -> str:
        return self.code.replace(_EXAMPLE_AGENT, agent) if agent else self.code

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in _BLOCK.finditer(text):
        words = frozenset((match["words"] or "").split()[:2]) & {"fragment", "continues", "consul", "serves"}
        line = text.count("\n", 0, match.start("code"))
        found.append(Block(page, line, match["code"], words))
    return found


def test_every_page_with_python_has_blocks_and_the_convention_is_documented() -> None:
    assert [b for b in blocks(ROOT / "README.md") if not b.words], "README lost its runnable blocks"
    assert "doc-test:" in (ROOT / "docs" / "index.md").read_text()


def _agent_services(address: str) -> set[str]:
    with urllib.request.urlopen(f"http://{address}/v1/agent/services", timeout=10) as response:
        return set(json.loads(response.read()))


def _deregister(address: str, service_id: str) -> None:
    request = urllib.request.Request(f"http://{address}/v1/agent/service/deregister/{service_id}", method="PUT")
    urllib.request.urlopen(request, timeout=10).read()


class Page:
    """Runs one page's blocks in order, as the convention says."""

    def __init__(self, agent: str | None) -> None:
        self.agent = agent
        self.namespace: dict[str, Any] = {}
        self.servers: list[tuple[threading.Thread, dict[str, Any], list[BaseException]]] = []

    def run(self, block: Block) -> None:
        if "fragment" in block.words:
            compile(textwrap.dedent(block.code), block.where, "exec")  # at least it parses
            return
        if "continues" not in block.words:
            self.namespace = {}
        code = compile(block.source(self.agent), block.where, "exec")
        if "serves" in block.words:
            self._serve(code, block)
        else:
            exec(code, self.namespace)

    def _serve(self, code: Any, block: Block) -> None:
        namespace = self.namespace
        failed: list[BaseException] = []

        def run() -> None:
            try:
                exec(code, namespace)
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run, name=f"doc-test {block.where}", daemon=True)
        thread.start()
        self.servers.append((thread, namespace, failed))
        deadline = threading.Event()
        timer = threading.Timer(_SERVING_WITHIN, deadline.set)
        timer.start()
        try:
            while not isinstance(namespace.get("served"), dc.Served) or namespace["served"].registration is None:
                assert not failed, f"{block.where} failed: {failed[0]!r}"
                assert thread.is_alive(), f"{block.where} ended without serving"
                assert not deadline.wait(0.02), f"{block.where} did not serve within {_SERVING_WITHIN} s"
        finally:
            timer.cancel()

    def close(self) -> None:
        for thread, namespace, failed in self.servers:
            namespace["served"].stop()
            thread.join(30)
            assert not thread.is_alive(), "a serving block did not end after stop()"
            if failed:
                raise failed[0]
        for value in self.namespace.values():
            if isinstance(value, dc.Backend):
                value.close()


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _pages() -> Iterator[Any]:
    for page in PAGES:
        if not blocks(page):
            continue
        marks = [pytest.mark.consul] if any("consul" in b.words for b in blocks(page)) else []
        if _page_id(page) in _PENDING:
            marks.append(_PENDING[_page_id(page)])
        yield pytest.param(page, id=_page_id(page), marks=marks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", list(_pages()))
def test_the_python_blocks_of_the_page_run(page: Path, request: pytest.FixtureRequest) -> None:
    page_blocks = blocks(page)
    agent: str | None = None
    before: set[str] = set()
    if any("consul" in b.words for b in page_blocks):
        agent = request.getfixturevalue("consul_agent").address
        before = _agent_services(agent)
    runner = Page(agent)
    try:
        for block in page_blocks:
            runner.run(block)
    finally:
        runner.close()
        if agent is not None:
            for service_id in _agent_services(agent) - before:
                _deregister(agent, service_id)
