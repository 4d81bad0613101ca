"""Only `coordination/services/` writes coordination models.

The scanner reads the server's source with `ast` and reports, outside the
services package (and outside migrations and tests):

1. ORM writes: `.save()`, `.delete()`, `.update()`, `.create()`, `.bulk_create()`,
   `.bulk_update()`, `.get_or_create()`, `.update_or_create()`, `.select_for_update()`,
   and a related manager's `.add()`/`.remove()`/`.set()`/`.clear()`. A call counts
   when its receiver is rooted at a coordination model (`Step.objects...`) or goes
   through one of their related managers (`workflow.steps...`); a receiver it cannot
   type counts too when the call has the shape of a model write (`x.save(...)`,
   `x.delete()`, `x.update(status=...)`). Managers of other apps' models
   (`User.objects...`) do not count.
2. SQL that writes a coordination table (INSERT, UPDATE, DELETE, TRUNCATE, MERGE,
   or a row lock) in any string literal, f-strings included.
3. `.execute()`/`.executemany()` of a statement the scanner cannot read (built by a
   call), since it could write anything.

`ALLOWLIST` names the few places that are not model writes; the admin site's
inherited writes are Django's and are checked by coordination/tests/test_admin.py.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.apps import apps

BASE_DIR = Path(__file__).resolve().parent.parent.parent
SCANNED = ["am_project", "coordination", "dashboard"]
SKIPPED = ["coordination/services", "coordination/migrations"]

# (path, enclosing function) -> why it is not a coordination model write. Keep it short, keep each entry true.
ALLOWLIST = {
    ("am_project/embedded.py", "_ensure_database"): "CREATE DATABASE for the embedded server, composed with "
                                                    "psycopg.sql; no coordination table exists yet",
    ("coordination/models.py", "Workflow.save"): "the model's own save, narrowed so that it never writes the "
                                                 "counters (the services' callers are checked as any other)",
}

ALWAYS = {"bulk_create", "bulk_update", "get_or_create", "update_or_create", "select_for_update"}
SHAPED = {"save", "delete", "update", "create"}
RELATED_ONLY = {"add", "remove", "set", "clear"}
EXECUTE = {"execute", "executemany"}
MANAGERS = {"objects", "_default_manager", "_base_manager"}

SQL_WRITE = re.compile(
    r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?|MERGE\s+INTO)\s+(?:ONLY\s+)?\"?coordination_\w+",
    re.IGNORECASE,
)
SQL_ROW_LOCK = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+|KEY\s+)?(?:UPDATE|SHARE)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.where or 'module'}): {self.what}"


def coordination_names() -> tuple[frozenset[str], frozenset[str]]:
    """The coordination models' class names, and the names of managers that reach them through a relation."""
    models = list(apps.get_app_config("coordination").get_models())
    related = set()
    for model in models:
        for field in model._meta.get_fields():
            if not (field.is_relation and field.concrete):
                continue
            accessor = field.remote_field.get_accessor_name()
            if accessor and not accessor.endswith("+"):
                related.add(accessor)  # e.g. workflow.steps, attempt.iterations
            if field.many_to_many:
                related.add(field.name)  # e.g. step.depends_on
    return frozenset(model.__name__ for model in models), frozenset(related)


def _chain(node: ast.expr) -> tuple[list[str], ast.expr]:
    """The attribute names from the receiver down to its root, and the root (`Step.objects.filter(...)` ->
    ["objects", "filter"], Name Step)."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            return names[::-1], node


def _sql_texts(node: ast.expr) -> list[str]:
    """The literal text of a string or f-string (its constant parts joined), or nothing."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [" ".join(part.value for part in node.values if isinstance(part, ast.Constant))]
    return []


def _writes_sql(text: str) -> bool:
    return bool(SQL_WRITE.search(text)) or ("coordination_" in text and bool(SQL_ROW_LOCK.search(text)))


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, model_names: frozenset[str], related: frozenset[str], constants: dict) -> None:
        self.path = path
        self.model_names = model_names
        self.related = related
        self.constants = constants
        self.scope: list[str] = []
        self.findings: list[Finding] = []

    def _report(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, node.lineno, ".".join(self.scope), what))

    def visit_FunctionDef(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and _writes_sql(node.value):
            self._report(node, f"SQL writing a coordination table: {node.value.strip()[:80]!r}")

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        text = _sql_texts(node)[0]
        if _writes_sql(text):
            self._report(node, f"SQL writing a coordination table: {text.strip()[:80]!r}")
        # Not generic_visit: the constant parts were read together.
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                self.visit(part)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if not isinstance(node.func, ast.Attribute):
            return
        method = node.func.attr
        names, root = _chain(node.func.value)
        rooted_here = isinstance(root, ast.Name) and root.id in self.model_names
        through_relation = any(name in self.related for name in names)
        # Another app's manager (User.objects..., get_user_model().objects...): not ours to guard.
        foreign = not rooted_here and any(name in MANAGERS for name in names)
        ours = rooted_here or through_relation
        positional, keywords = bool(node.args), bool(node.keywords)
        if method in EXECUTE:
            self._check_execute(node)
        elif foreign:
            return
        elif method in ALWAYS:
            self._report(node, f".{method}()")
        elif method in RELATED_ONLY and through_relation:
            self._report(node, f".{method}() on a related manager")
        elif method in SHAPED and (ours or self._shaped_like_a_model_write(method, positional, keywords)):
            self._report(node, f".{method}()")

    @staticmethod
    def _shaped_like_a_model_write(method: str, positional: bool, keywords: bool) -> bool:
        if method == "save":
            return True  # Model.save(force_insert=..., update_fields=...); nothing else here is saved
        if method == "delete":
            return not positional  # obj.delete() / queryset.delete(), not cache.delete(key)
        return keywords and not positional  # queryset.update(status=...), not mapping.update(other)

    def _check_execute(self, node: ast.Call) -> None:
        if not node.args:
            return
        statement = node.args[0]
        if isinstance(statement, ast.Name) and statement.id in self.constants:
            statement = self.constants[statement.id]
        texts = _sql_texts(statement)
        if not texts:
            self._report(node, f".{node.func.attr}() of a statement the guard cannot read: "
                               f"{ast.unparse(statement)[:80]}")
        # A readable statement was checked as a literal already (visit_Constant / visit_JoinedStr).


def scan_source(source: str, path: str, model_names: frozenset[str], related: frozenset[str]) -> list[Finding]:
    tree = ast.parse(source, filename=path)
    # Module-level statements (`CLAIM_SQL = "..."`) resolve names passed to execute().
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if _sql_texts(node.value):
                constants[node.targets[0].id] = node.value
    scanner = _Scanner(path, model_names, related, constants)
    scanner.visit(tree)
    return scanner.findings


def server_sources() -> list[Path]:
    files = []
    for top in SCANNED:
        for path in sorted((BASE_DIR / top).rglob("*.py")):
            relative = path.relative_to(BASE_DIR).as_posix()
            if "tests" in path.relative_to(BASE_DIR).parts or any(relative.startswith(s + "/") for s in SKIPPED):
                continue
            files.append(path)
    return files


def scan_server() -> list[Finding]:
    model_names, related = coordination_names()
    findings = []
    for path in server_sources():
        relative = path.relative_to(BASE_DIR).as_posix()
        findings.extend(scan_source(path.read_text(), relative, model_names, related))
    return findings


class WriteGuardTests:
    def test_it_finds_no_coordination_write_outside_the_services(self):
        findings = scan_server()
        unexplained = [f for f in findings if (f.path, f.where) not in ALLOWLIST]
        assert not unexplained, "Writes outside coordination/services/ (move them into a service):\n" + "\n".join(
            map(str, unexplained))

    def test_it_keeps_no_stale_allowlist_entry(self):
        used = {(f.path, f.where) for f in scan_server()}
        assert set(ALLOWLIST) <= used, f"Allowed but no longer found; remove: {set(ALLOWLIST) - used}"

    def test_it_scans_the_server_but_not_the_services_migrations_or_tests(self):
        scanned = {path.relative_to(BASE_DIR).as_posix() for path in server_sources()}
        assert {"coordination/api/views.py", "coordination/admin.py", "coordination/tasks.py",
                "coordination/mcp_server.py", "dashboard/views.py", "am_project/stack.py"} <= scanned
        assert not any(p.startswith(("coordination/services/", "coordination/migrations/")) or "/tests/" in p
                       for p in scanned)

    @pytest.mark.parametrize("line", [
        'Step.objects.filter(id=x).update(status="ready")',
        'Workflow.objects.create(name="w")',
        'step.save(update_fields=["status"])',
        "lock.delete()",
        'workflow.steps.update(status="skipped")',
        "step.depends_on.add(other)",
        "Step.objects.select_for_update().get(id=x)",
        "FileLock.objects.bulk_create(locks)",
        'Agent.objects.update_or_create(name="a", defaults={})',
        "rows = Step.objects.filter(status='ready')\nrows.update(status='pending')",
        'cursor.execute("UPDATE coordination_step SET status = \'ready\' WHERE id = %s", [x])',
        'RESET_SQL = "DELETE FROM coordination_filelock WHERE expires_at < now()"',
        'cursor.execute(f"INSERT INTO coordination_event (kind) VALUES ({kind})")',
        'LOCK_SQL = "SELECT id FROM coordination_step WHERE id = %s FOR UPDATE"',
        "cursor.execute(build_statement())",
    ])
    def test_it_reports_a_new_violation(self, line):
        model_names, related = coordination_names()
        source = "def handler(x, other, locks, cursor, kind, step, lock, workflow):\n" + "\n".join(
            "    " + part for part in line.splitlines())
        findings = scan_source(source, "coordination/new_module.py", model_names, related)
        assert findings, f"not reported: {line}"
        assert all(f.path == "coordination/new_module.py" and f.where == "handler" for f in findings)

    @pytest.mark.parametrize("line", [
        "Step.objects.filter(id=x).exists()",
        'context.update({"steps": steps})',
        "seen.add(x)",
        "cache.delete(key)",
        'get_user_model().objects.filter(username="a").update(is_active=False)',
        'User.objects.create_user(username="a")',
        'cursor.execute("SELECT pg_notify(%s, k) FROM unnest(%s::text[]) AS k", [channel, keys])',
        'conn.execute(f"LISTEN {channel}")',
        "cursor.execute(READ_SQL, {})",
        "asyncio.get_running_loop().create_task(coroutine)",
    ])
    def test_it_leaves_reads_and_other_objects_alone(self, line):
        model_names, related = coordination_names()
        source = ('READ_SQL = "SELECT id FROM coordination_step"\n\n'
                  "def handler(x, key, channel, keys, cursor, conn):\n    " + line)
        assert scan_source(source, "coordination/new_module.py", model_names, related) == []
