"""Temporary names of atomic writes on a filesystem that several nodes share."""

from __future__ import annotations

import os
import socket

from gmeta import storage
from gmeta.storage import write_atomic


def test_two_nodes_with_the_same_pid_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Node A is still writing its temporary file when node B, whose writer has the same
    process id, writes the same file: each must write its own temporary file."""
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    host = {"name": "node-a"}
    monkeypatch.setattr(socket, "gethostname", lambda: host["name"])
    target = tmp_path / "shared.json"
    used = []

    def write_b(p):
        used.append(p.name)
        p.write_text("from b")

    def write_a(p):
        used.append(p.name)
        p.write_text("from a, part 1 ")
        host["name"] = "node-b"
        write_atomic(target, write_b)  # B finishes while A is midway
        with open(p, "a") as f:
            f.write("part 2")

    write_atomic(target, write_a)
    assert len(set(used)) == 2, used
    assert "node-a" in used[0] and "node-b" in used[1] and all(n.endswith(".tmp") for n in used)
    assert target.read_text() == "from a, part 1 part 2"  # A's file whole, renamed last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.json"]  # no temporary file left


def test_a_restarted_process_with_a_reused_pid_gets_a_new_temporary_name(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 7)
    monkeypatch.setattr(socket, "gethostname", lambda: "node.example.com")
    a, b = storage.temp_name(tmp_path / "x"), storage.temp_name(tmp_path / "x")
    assert a != b and a.parent == tmp_path and a.name.startswith("x.node_example_com.7.")
