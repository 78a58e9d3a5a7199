"""The README's example runs as written."""

from __future__ import annotations

import os
import re
import sqlite3

from conftest import ROOT


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
