"""``GET /v1/jobs/{id}/samples``: the sample responses a job stored at its evaluations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app import jobs
from app.auth import PrincipalDep
from app.deps import SessionDep
from app.params import AfterStepQuery, JobIdPath
from app.schemas import SampleList, SampleStepOut
from store.samples import list_samples

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("/{job_id}/samples", response_model=SampleList)
def get_samples(
    job_id: JobIdPath,
    session: SessionDep,
    principal: PrincipalDep,
    after_step: AfterStepQuery = 0,
    limit: Annotated[int, Query(ge=1, le=100, description="steps per page")] = 20,
) -> SampleList:
    """The samples stored at each evaluation step after ``after_step``, by step: at most
    ``limit`` steps per page (each step at most 64 samples). A PPO job stores its rollouts'
    prompts, responses and rewards there (docs/ppo.md); other jobs have none (an empty
    list). Another principal's job is 404, as for every job route."""
    jobs.get_job(session, principal, job_id)
    rows, has_more = list_samples(session, job_id, after_step, limit)
    return SampleList(
        data=[SampleStepOut(step=r.step, created_at=r.created_at, samples=list(r.values))
              for r in rows],
        has_more=has_more)
