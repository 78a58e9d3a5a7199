"""The README's example runs as written."""

from __future__ import annotations

import os
import re
import sqlite3

from support import ROOT


def test_readme_python_example_runs(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    db = sqlite3.connect(tmp_path / "app.db")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT, parts JSON)")
    db.executemany("INSERT INTO messages (body) VALUES (?)", [("hi",), ("",), (None,)])
    db.commit()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert '"state": "success"' in capsys.readouterr().out.replace("'", '"')
    stored = db.execute("SELECT parts FROM messages ORDER BY id").fetchall()
    assert stored == [('[{"type":"text","text":"hi"}]',), ("[]",), ("[]",)]


def test_readme_schema_example_copies_with_its_context(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Migrations over a schema you did not design") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    db = sqlite3.connect(tmp_path / "app.db")
    db.executescript(
        """
        CREATE TABLE "Chat" (id INTEGER PRIMARY KEY, "migratedCount" INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE "Message" (id TEXT PRIMARY KEY, "chatId" INTEGER, role TEXT,
                                "Body Text" TEXT);
        CREATE TABLE "MessageV2" (id TEXT PRIMARY KEY, "chatId" INTEGER, parts JSON);
        INSERT INTO "Chat" (id) VALUES (1), (2);
        INSERT INTO "Message" VALUES ('a1', 1, 'assistant', 'hi'), ('u1', 1, 'user', 'yo'),
                                     ('a2', 2, 'assistant', 'ok'), ('a3', 2, 'assistant', '!');
        """
    )
    db.commit()
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    from backfill import Runner

    url = f"sqlite:///{tmp_path / 'app.db'}"
    [result] = Runner(url, namespace["migrations"]).run(["to_v2"])  # type: ignore[arg-type]

    assert result.status.changed == 3 and result.status.total == 3
    assert db.execute('SELECT id, "chatId", parts FROM "MessageV2" ORDER BY id').fetchall() == [
        ("a1", 1, '[{"type":"text","text":"hi"}]'),
        ("a2", 2, '[{"type":"text","text":"ok"}]'),
        ("a3", 2, '[{"type":"text","text":"!"}]'),
    ]
    assert db.execute('SELECT "migratedCount" FROM "Chat" ORDER BY id').fetchall() == [(1,), (2,)]
