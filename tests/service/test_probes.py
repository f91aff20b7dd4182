"""Health checks and metrics scrapes stay cheap, since load balancers and Prometheus send many a second while the
device works: they are answered on the event loop without a hop to the thread pool."""

import anyio.to_thread
import pytest

PROBES = ["/health", "/health/ready", "/metrics"]


@pytest.fixture
def thread_pool_calls(monkeypatch) -> list[object]:
    """Every function the app hands to the thread pool from now on."""
    calls: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(function, *args, **kwargs):
        calls.append(function)
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
    return calls


@pytest.mark.parametrize("path", PROBES)
def test_a_probe_is_answered_without_the_thread_pool(client, small_request, thread_pool_calls, path):
    assert client.post("/generate", json=small_request()).status_code == 200  # the default model serves: ready
    thread_pool_calls.clear()

    response = client.get(path)

    assert response.status_code == 200, response.text
    assert thread_pool_calls == []


def test_a_route_that_reads_the_database_still_runs_it_on_the_thread_pool(client, thread_pool_calls):
    """The control: the counter sees the hops where they belong (a job lookup reads the database)."""
    response = client.get("/jobs/no-such-job")

    assert response.status_code == 404
    assert thread_pool_calls, "a job lookup ran on the event loop"
