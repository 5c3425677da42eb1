"""Each worker's share of the client limits: the shares add up to what is configured, and unlimited stays unlimited;
the backend limits are not split (the workers' slot table holds them for the whole pgmux)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.settings import load_settings, usable_cpus
from proxy.slots import share
from proxy.workers import merge_expositions, worker_settings

UPSTREAM = "postgresql://app:secret@db.example.com/app"


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 7, 20, 1000])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_the_shares_of_a_limit_add_up_to_the_limit_and_differ_by_at_most_one(limit: int, workers: int) -> None:
    parts = [share(limit, workers, worker) for worker in range(workers)]
    if limit == 0:
        assert parts == [0] * workers  # 0 means unlimited: every worker is unlimited
    else:
        assert sum(parts) == limit
        assert max(parts) - min(parts) <= 1


def test_client_limits_and_min_pool_size_are_split_among_the_workers_and_backend_limits_are_not() -> None:
    settings = load_settings(None, [], upstream_url=UPSTREAM, default_pool_size=5, min_pool_size=3,
                             max_client_conn=101, max_db_connections=9, max_user_connections=7, reserve_pool_size=3,
                             max_user_client_connections=10,
                             databases={"other": {"url": "postgresql://o:p@db.example.com/other", "pool_size": 4,
                                                  "max_db_client_connections": 6}})
    first, second = (worker_settings(settings, 2, worker) for worker in (0, 1))
    assert (first.max_client_conn, second.max_client_conn) == (51, 50)
    assert (first.min_pool_size, second.min_pool_size) == (2, 1)
    assert first.max_user_client_connections == second.max_user_client_connections == 5
    assert [worker.databases["other"].max_db_client_connections for worker in (first, second)] == [3, 3]
    for worker in (first, second):  # held for the whole pgmux by the slot table (proxy/slots.py)
        assert (worker.default_pool_size, worker.reserve_pool_size) == (5, 3)
        assert (worker.max_db_connections, worker.max_user_connections) == (9, 7)
        assert worker.databases["other"].pool_size == 4
    assert worker_settings(settings, 1, 0) is settings


def test_each_worker_serves_its_metrics_on_a_private_loopback_port_for_the_supervisor() -> None:
    settings = load_settings(None, [], upstream_url=UPSTREAM, metrics_listen="0.0.0.0:9127")
    assert worker_settings(settings, 2, 0).metrics_listen == worker_settings(settings, 2, 1).metrics_listen \
        == "127.0.0.1:0"
    assert worker_settings(load_settings(None, [], upstream_url=UPSTREAM), 2, 1).metrics_listen is None


def test_merged_metrics_label_every_sample_with_its_worker_and_keep_each_family_together() -> None:
    first = ('# HELP pgmux_clients Clients.\n# TYPE pgmux_clients gauge\npgmux_clients{state="active"} 3.0\n'
             '# HELP pgmux_up Up.\n# TYPE pgmux_up gauge\npgmux_up 1.0\n')
    second = ('# HELP pgmux_clients Clients.\n# TYPE pgmux_clients gauge\npgmux_clients{state="active"} 4.0\n'
              '# HELP pgmux_up Up.\n# TYPE pgmux_up gauge\npgmux_up 1.0\n')
    assert merge_expositions({1: second, 0: first}).splitlines() == [
        "# HELP pgmux_clients Clients.", "# TYPE pgmux_clients gauge",
        'pgmux_clients{worker="0",state="active"} 3.0', 'pgmux_clients{worker="1",state="active"} 4.0',
        "# HELP pgmux_up Up.", "# TYPE pgmux_up gauge", 'pgmux_up{worker="0"} 1.0', 'pgmux_up{worker="1"} 1.0',
    ]


def test_a_client_limit_smaller_than_the_number_of_workers_is_refused_naming_the_setting() -> None:
    load_settings(None, [], upstream_url=UPSTREAM, max_client_conn=2, workers=2)
    with pytest.raises(ValidationError, match="max_client_conn = 2 is smaller than workers = 3"):
        load_settings(None, [], upstream_url=UPSTREAM, max_client_conn=2, workers=3)
    # A share of 0 would mean no limit at all for that worker.
    with pytest.raises(ValidationError, match="max_user_client_connections = 1 is smaller than workers = 2"):
        load_settings(None, [], upstream_url=UPSTREAM, max_user_client_connections=1, workers=2)
    with pytest.raises(ValidationError, match="databases.other.max_db_client_connections = 1 is smaller than workers"):
        load_settings(None, [], upstream_url=UPSTREAM, workers=2,
                      databases={"other": {"url": "postgresql://o:p@db.example.com/other",
                                           "max_db_client_connections": 1}})


def test_a_backend_limit_smaller_than_the_number_of_workers_is_fine_the_workers_share_it() -> None:
    settings = load_settings(None, [], upstream_url=UPSTREAM, default_pool_size=1, max_db_connections=1,
                             max_user_connections=1, workers=4,
                             databases={"other": {"url": "postgresql://o:p@db.example.com/other", "pool_size": 1}})
    assert settings.worker_count() == 4


def test_workers_auto_is_the_number_of_cores_this_process_may_use() -> None:
    import os

    auto = load_settings(None, ["--workers", "auto"], upstream_url=UPSTREAM).worker_count()
    assert auto == usable_cpus()
    assert 1 <= auto <= len(os.sched_getaffinity(0))
    assert load_settings(None, [], upstream_url=UPSTREAM).worker_count() == 1


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", 64),  # no limit
    ("200000 100000\n", 2),  # a pod's `limits: cpu: 2`
    ("150000 100000\n", 2),  # 1.5 CPUs: rounded up
    ("50000 100000\n", 1),  # half a CPU: still one worker
    ("6400000 100000\n", 64),  # a quota above the cores this process may use
    ("", 64),  # unreadable: no quota
])
def test_usable_cpus_follow_a_cgroup_cpu_quota_below_the_affinity(tmp_path, monkeypatch, cpu_max: str,
                                                                  expected: int) -> None:
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core node
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert usable_cpus(path) == expected


def test_usable_cpus_without_a_cgroup_file_are_the_affinity() -> None:
    import os

    assert usable_cpus(Path("/nonexistent/cpu.max")) == len(os.sched_getaffinity(0))
