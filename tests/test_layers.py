"""The map in reqapi.py's docstring is true: checked by parsing the module, and by tracing one GET.

(a) a section uses only the sections above it; (b) state is changed only through its owner's
methods; (c) response bytes are made in one place.  The trace runs a real Runtime in this
process, over real TLS, and counts the calls that go from one section into another.
"""

from __future__ import annotations

import ast
import http.client
import re
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest

import reqapi
from conftest import runtime_in_process

SOURCE_PATH = Path(reqapi.__file__).resolve()
SOURCE = SOURCE_PATH.read_text(encoding="utf-8")
TREE = ast.parse(SOURCE)
HEADER = re.compile(r"^# (\d+)\. (.+?)(?: \(.*)?$")
GV = "/apis/k8s.wujiuye.com/v1beta1"


def section_starts() -> list[tuple[int, int, str]]:
    """(first line, number, title) of each section header comment, in file order."""
    starts = []
    for lineno, line in enumerate(SOURCE.splitlines(), 1):
        match = HEADER.match(line)
        if match:
            starts.append((lineno, int(match.group(1)), match.group(2).split(":")[0]))
    return starts


STARTS = section_starts()


def section_at(lineno: int) -> int:
    """The section a line belongs to (0 before the first header: imports and __version__)."""
    number = 0
    for start, section, _ in STARTS:
        if start <= lineno:
            number = section
    return number


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [leaf.id for target in targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name)]
    return []


def definitions() -> dict[str, int]:
    """Module-level name -> the section that defines it."""
    found: dict[str, int] = {}
    for node in TREE.body:
        for name in defined_names(node):
            assert name not in found, f"{name} is defined twice"
            found[name] = section_at(node.lineno)
    return found


def used_names(node: ast.AST) -> set[str]:
    """Names a top-level statement reads, including those in annotations written as strings."""
    names = set()
    for leaf in ast.walk(node):
        if isinstance(leaf, ast.Name) and isinstance(leaf.ctx, ast.Load):
            names.add(leaf.id)
        annotations = []
        if isinstance(leaf, (ast.arg, ast.AnnAssign)) and leaf.annotation is not None:
            annotations.append(leaf.annotation)
        if isinstance(leaf, (ast.FunctionDef, ast.AsyncFunctionDef)) and leaf.returns is not None:
            annotations.append(leaf.returns)
        for annotation in annotations:
            for part in ast.walk(annotation):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    names |= used_names(ast.parse(part.value, mode="eval"))
    return names


def test_sections_are_numbered_in_order_and_are_the_docstring_map():
    numbers = [number for _, number, _ in STARTS]
    assert numbers == list(range(1, 14)), numbers
    docstring = ast.get_docstring(TREE)
    for _, number, title in STARTS:
        # The map lists each section as " N. Title ..." with the header's title.
        assert re.search(rf"^\s*{number}\. {re.escape(title)}\b", docstring, re.M), (number, title)
    # Nothing but imports, the version and the early-signal latch (signals noted from the first
    # instruction, see the top of reqapi.py) comes before the first section.
    for node in TREE.body:
        if section_at(node.lineno) == 0:
            latch = defined_names(node) == ["_early_signals"] or (
                isinstance(node, ast.If) and "_early_signals.append" in ast.unparse(node))
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)) or latch or \
                defined_names(node) == ["__version__"], ast.unparse(node)[:80]


def test_a_section_uses_only_the_sections_above_it():
    defined = definitions()
    problems = []
    for node in TREE.body:
        here = section_at(node.lineno)
        for name in sorted(used_names(node)):
            if name in defined and defined[name] > here:
                problems.append(f"line {node.lineno} (section {here}) uses {name} from section {defined[name]}")
    assert not problems, "\n".join(problems)


# Attribute assignments on objects other than self: each is on an object the same function just
# made (configuring it), except these, each with its reason.
ALLOWED_FOREIGN_WRITES = {
    # A Request belongs to the one thread answering it; routing fills in its path parameters once.
    ("Api.handle", "request.params"),
    # ...and, once the caller is known, whether health details may be shown to it.
    ("Api.handle", "request.trusted"),
}


class _Writes(ast.NodeVisitor):
    def __init__(self) -> None:
        self.scope: list[str] = []
        self.local_objects: list[set[str]] = [set()]
        self.foreign: list[tuple[int, str, str]] = []
        self.module_mutations: list[tuple[int, str]] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        made = {target.id for stmt in ast.walk(node)
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call)
                for target in stmt.targets if isinstance(target, ast.Name)}
        made |= {stmt.name for stmt in ast.walk(node) if isinstance(stmt, ast.FunctionDef) and stmt is not node}
        self.local_objects.append(made)
        self.generic_visit(node)
        self.local_objects.pop()
        self.scope.pop()

    def _store(self, target: ast.AST, lineno: int) -> None:
        for leaf in ast.walk(target):
            if not isinstance(leaf, (ast.Attribute, ast.Subscript)) or not isinstance(leaf.ctx, ast.Store):
                continue
            holder = leaf.value          # the object whose attribute or item is written
            if isinstance(holder, ast.Name) and holder.id.lstrip("_").isupper():        # a module constant
                self.module_mutations.append((lineno, ast.unparse(leaf)))
            elif isinstance(leaf, ast.Attribute):
                # Allowed: self.x = ..., and configuring an object this function just made.
                if not (isinstance(holder, ast.Name) and (holder.id in ("self", "cls") or
                                                          holder.id in self.local_objects[-1])):
                    self.foreign.append((lineno, ".".join(self.scope), ast.unparse(leaf)))
            elif isinstance(holder, ast.Attribute):
                # An item of a container: allowed in the function's own self.x, not in self.x.y or other.x.
                if not (isinstance(holder.value, ast.Name) and holder.value.id in ("self", "cls")):
                    self.foreign.append((lineno, ".".join(self.scope), ast.unparse(leaf)))

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self._store(target, node.lineno)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._store(node.target, node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name) and \
                function.value.id.lstrip("_").isupper() and function.attr in (
                    "append", "extend", "insert", "update", "clear", "pop", "popitem", "setdefault", "add",
                    "remove", "discard", "sort", "reverse"):
            self.module_mutations.append((node.lineno, ast.unparse(node)))
        self.generic_visit(node)


def test_state_is_changed_only_through_its_owner():
    writes = _Writes()
    writes.visit(TREE)
    foreign = [(lineno, scope, target) for lineno, scope, target in writes.foreign
               if (scope, target) not in ALLOWED_FOREIGN_WRITES]
    assert not foreign, "attributes written by a function that does not own them:\n" + "\n".join(map(str, foreign))
    assert not writes.module_mutations, f"module-level constants changed: {writes.module_mutations}"
    assert not [node for node in ast.walk(TREE) if isinstance(node, (ast.Global, ast.Nonlocal))]


# Private attributes read from outside their object: none but these.
ALLOWED_PRIVATE_READS = {
    "os._exit",                  # a second SIGTERM exits at once, skipping cleanup
    "ssl._ssl",                  # the CPython TLS internals that require_tls_introspection looks up
    "ssl._ssl._SSLSocket",
    "tls._sslobj",               # the verified chain before Python 3.13
    "response._replace",         # NamedTuple's public API, whatever its name says
}


def test_no_function_reads_another_objects_private_attributes():
    reads = sorted({ast.unparse(node) for node in ast.walk(TREE)
                    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))})
    assert set(reads) <= ALLOWED_PRIVATE_READS, set(reads) - ALLOWED_PRIVATE_READS


def test_the_state_rule_test_can_fail():
    writes = _Writes()
    writes.visit(ast.parse("def reload(app):\n    app.rules_refused = 'x'\n\nLIMITS = {}\n"
                           "def grow():\n    LIMITS['a'] = 1\n    LIMITS.update(b=2)\n"
                           "class Server:\n    def swap(self):\n        self.api.health.draining = True\n"
                           "        self.api.memo['k'] = 1\n        self.own['k'] = 1\n        self.ok = 1\n"))
    assert writes.foreign == [(2, "reload", "app.rules_refused"), (10, "Server.swap", "self.api.health.draining"),
                              (11, "Server.swap", "self.api.memo['k']")]
    assert [target for _, target in writes.module_mutations] == ["LIMITS['a']", "LIMITS.update(b=2)"]


RESPONSE_BYTES = re.compile(r"HTTP/1\.[01] \d|HTTP/1\.1 \{|Transfer-Encoding|Content-Length: |%x\\r\\n|0\\r\\n\\r\\n")


def test_response_bytes_are_made_in_one_place():
    """Status lines, framing headers and chunks appear only in section 4 (ResponseEncoder and the
    one fixed answer to a plain-HTTP client); the transport sends what it is given."""
    places = []
    for node in ast.walk(TREE):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if RESPONSE_BYTES.search(text.replace("\r\n", "\\r\\n")):
                places.append((node.lineno, section_at(node.lineno)))
    assert places and {section for _, section in places} == {4}, places
    encoder_lines = [node for node in TREE.body if isinstance(node, ast.ClassDef) and node.name == "ResponseEncoder"]
    assert encoder_lines, "ResponseEncoder is gone"
    sends = [node for node in ast.walk(TREE) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("sendall", "send", "write")]
    assert {section_at(node.lineno) for node in sends} <= {8, 11}, [node.lineno for node in sends]


# ---------------------------------------------------------------------------------------
# The trace: one GET of an object, through a Runtime in this process
# ---------------------------------------------------------------------------------------

def _section_of_code(code) -> Optional[int]:
    if code.co_filename != str(SOURCE_PATH):
        return None
    return section_at(code.co_firstlineno)


class CrossingTrace:
    """A sys.setprofile hook for the connection threads: every call into reqapi's code, with the
    section of the nearest reqapi caller (stdlib frames in between, such as a dataclass __init__,
    are skipped over)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Optional[int]]] = []     # (function, section, caller's section)
        self.lock = threading.Lock()

    def __call__(self, frame, event: str, arg) -> None:
        if event != "call" or threading.current_thread().name.startswith("reloader"):
            return
        section = _section_of_code(frame.f_code)
        if section is None:
            return
        caller = frame.f_back
        while caller is not None and _section_of_code(caller.f_code) is None:
            caller = caller.f_back
        with self.lock:
            self.calls.append((frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname")
                               else frame.f_code.co_name, section,
                               None if caller is None else _section_of_code(caller.f_code)))

    def answers(self) -> list[list[tuple[str, int, int]]]:
        """The calls made while answering each request, split at Connection.answer."""
        answers: list[list[tuple[str, int, int]]] = []
        for name, section, caller in self.calls:
            if name.endswith("Connection.answer"):
                answers.append([])
            elif answers and caller is not None:
                answers[-1].append((name, section, caller))
        return answers


@pytest.fixture()
def traced_runtime(certs, tmp_path):
    if sys.getprofile() is not None or threading.getprofile() is not None:
        pytest.skip("another profiler (e.g. coverage) is installed: the trace would measure it too")
    runtime = runtime_in_process(certs)
    trace = CrossingTrace()
    threading.setprofile(trace)          # threads started from now on: the connection threads
    try:
        runtime.start()
        yield runtime, trace
    finally:
        threading.setprofile(None)
        runtime.drain()


def test_a_get_of_an_object_crosses_few_sections_and_only_downwards(traced_runtime, certs):
    runtime, trace = traced_runtime
    host, port = runtime.address
    connection = http.client.HTTPSConnection(host, port, context=certs.client_context(), timeout=10)
    try:
        # A first GET warms what is computed once per process (the anonymous identity's log text);
        # then three GETs of one name; the /livez after them lets the last one's accounting finish.
        for path in ("warm-up", "steady", "steady", "steady"):
            connection.request("GET", f"{GV}/namespaces/default/requests/{path}")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        connection.request("GET", "/livez")
        assert connection.getresponse().read() == b"ok"
    finally:
        connection.close()
    answers = trace.answers()
    assert len(answers) == 5, [len(calls) for calls in answers]
    for calls in answers:
        upward = [(name, caller, section) for name, section, caller in calls if section > caller]
        assert not upward, f"calls up the layers (function, from section, to section): {upward}"
    first, again, later = ([name for name, section, caller in calls if section != caller] for calls in answers[1:4])
    print("sections crossed by a GET of an object:", first, again, later, sep="\n  ")
    # Asked again within the second, the transport's answer memo sends the kept answer: 3 crossings.
    memo_hit = ["head_without_audit_id", "ResponseEncoder.reuse", "record_answer"]
    # Otherwise (a new second empties the memos) the request goes through the API and the answer is kept.
    memo_miss = ["head_without_audit_id", "parse_head", "Api.handle", "Access.caller", "Access.admit", "object_options",
                 "workload_problems", "Generation.prediction", "requests_object_json", "ResponseEncoder.reusable",
                 "ResponseEncoder.reuse", "record_request"]
    # The first GET of a name in a rules generation also asks the rules (section 2): 13 crossings.
    assert first == memo_miss[:8] + ["Rules.predict"] + memo_miss[8:], first
    # The same GET again: 3 crossings when the answer memo answers, 12 when a new second starts
    # a new memo (which one depends on the clock).
    for calls in (again, later):
        assert calls in (memo_hit, memo_miss), calls
