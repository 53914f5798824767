"""The runner's ``on_samples`` (a PPO job's sample responses, :mod:`store.samples`) through a
real PostgreSQL restart: samples reported while the database is down are kept, the newest per
step, and arrive once when it is back; a stale attempt writes none."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import update

from store.db import session_scope
from store.models import Job
from store.progress import claim_job
from store.samples import list_samples
from tests.support.jobenv import Env, make_env
from tests.support.postgres import PostgresServer
from worker.runner import DatabaseHooks, DbRetry

# A safety net for the retries, not a measured bound.
DEADLINE_S = 120.0


def _hooks(env: Env, retry: DbRetry) -> tuple[str, DatabaseHooks]:
    job_id = env.submit()
    with session_scope(env.factory) as s:
        assert claim_job(s, job_id, "w") is not None
    return job_id, DatabaseHooks(job_id, 1, env.factory, env.storage, 3, retry=retry)


def _sample(text: str) -> dict[str, object]:
    return {"prompt": "", "response": text, "reward": 0.5, "kl": 0.1}


def _stored(env: Env, job_id: str) -> dict[int, list[dict[str, object]]]:
    with session_scope(env.factory) as s:
        rows, _ = list_samples(s, job_id, 0, 100)
        return {r.step: list(r.values) for r in rows}


def test_samples_reported_during_a_postgres_restart_arrive_once(
    tmp_path: Path, private_postgres: PostgresServer,
) -> None:
    env = make_env(tmp_path, private_postgres.create_database("samples"))
    job_id, hooks = _hooks(env, DbRetry(budget_s=DEADLINE_S, first_s=0.1, max_s=0.5))
    hooks.on_samples(4, [_sample("aaaa")])
    private_postgres.stop()
    hooks.on_samples(8, [_sample("bbbb")])  # fails: kept
    hooks.on_samples(8, [_sample("cccc")])  # the same step again: the newest is kept
    hooks.on_samples(12, [_sample("dddd")])
    assert sorted(hooks.unsent_samples) == [8, 12] and not hooks.lost
    writer = threading.Thread(target=hooks.drain)  # as before a checkpoint or the finish
    writer.start()  # retries until the server is back
    time.sleep(0.5)
    assert writer.is_alive()
    private_postgres.start()
    writer.join(DEADLINE_S)
    assert not writer.is_alive() and hooks.unsent_samples == {} and not hooks.lost
    assert _stored(env, job_id) == {4: [_sample("aaaa")], 8: [_sample("cccc")],
                                    12: [_sample("dddd")]}


def test_a_stale_attempt_writes_no_samples(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    job_id, hooks = _hooks(env, DbRetry(budget_s=5, first_s=0.1, max_s=0.5))
    hooks.on_samples(2, [_sample("aa")])
    with session_scope(env.factory) as s:  # the sweep gave the job to attempt 2
        s.execute(update(Job).where(Job.id == job_id).values(attempts=2))
    hooks.on_samples(4, [_sample("bb")])
    assert hooks.lost and hooks.should_stop()
    assert _stored(env, job_id) == {2: [_sample("aa")]}
