"""How ``appliance serve`` sets up its local nodes (pure parts)."""

from __future__ import annotations

from pathlib import Path

from appliance.local_ring import LocalRing, alone_threads_per_node, node_command, threads_per_node


def test_local_nodes_share_the_cores_unless_given_a_thread_count() -> None:
    assert threads_per_node(LocalRing(nodes=1), cores=2) == 2
    assert threads_per_node(LocalRing(nodes=3), cores=2) == 1  # never 0
    assert threads_per_node(LocalRing(nodes=3), cores=16) == 5
    assert threads_per_node(LocalRing(nodes=3, node_threads=2), cores=2) == 2
    assert threads_per_node(LocalRing(nodes=1, node_threads=4), cores=2) == 4


def test_a_node_command_carries_the_thread_count(tmp_path: Path) -> None:
    command = node_command(0, "http://127.0.0.1:1", tmp_path, 2, 3, "warning", tmp_path / "s")
    assert command[command.index("--intra-op-threads") + 1] == "2"


def test_alone_sessions_get_the_cores_only_where_serve_shared_them_out() -> None:
    assert alone_threads_per_node(LocalRing(nodes=3), cores=2) == 2  # 1 thread a node
    assert alone_threads_per_node(LocalRing(nodes=3), cores=16) == 16
    assert alone_threads_per_node(LocalRing(nodes=1), cores=2) == 0  # the node has them all
    assert alone_threads_per_node(LocalRing(nodes=3, node_threads=2), cores=2) == 0  # as asked
    assert alone_threads_per_node(LocalRing(nodes=3, alone_threads=0), cores=2) == 0
    assert alone_threads_per_node(LocalRing(nodes=3, alone_threads=4), cores=2) == 4


def test_a_node_command_carries_the_alone_threads(tmp_path: Path) -> None:
    command = node_command(0, "http://127.0.0.1:1", tmp_path, 1, 3, "warning", tmp_path / "s",
                           alone_threads=2)  # fmt: skip
    assert command[command.index("--alone-intra-op-threads") + 1] == "2"
