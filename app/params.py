"""Path and query parameters shared by the routes, bounded so that every value the OpenAPI
document allows can be stored and looked up on every database backend (a NUL in a string or
an integer past PostgreSQL's ``integer`` is a 422 naming the parameter, never a 500).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator

from core.spec import NO_CONTROL_PATTERN, check_text

# The ids the service makes (store.models.new_id): "<kind>_<32 hex digits>".
ID_PATTERN = r"^[a-z]+_[0-9a-f]{32}$"
# Ids longer than this name nothing (the longest the service makes has 37 characters).
ID_MAX_CHARS = 100
# PostgreSQL's ``integer`` (metric steps): 2^31 - 1.
MAX_INT32 = 2**31 - 1


def _id_path(description: str) -> object:
    return Path(description=description, min_length=1, max_length=ID_MAX_CHARS,
                json_schema_extra={"pattern": NO_CONTROL_PATTERN})


# An id in a path: any text without control characters (an unknown one is a 404).
JobIdPath = Annotated[str, _id_path("the job's id (job_...)"), AfterValidator(check_text)]
DatasetIdPath = Annotated[str, _id_path("the dataset's id (ds_...)"), AfterValidator(check_text)]
CheckpointIdPath = Annotated[str, _id_path("the checkpoint's id (ckpt_...)"),
                             AfterValidator(check_text)]

# ``?after=``: the id of the last item of the previous page (its ``next_after``); a malformed
# one is a 422, a well-formed one that names no item of the list a 404.
AfterQuery = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description="the previous page's next_after: the id of its "
                                          "last item"),
]
# ``?after_step=`` of the metrics: steps are stored as PostgreSQL ``integer``.
AfterStepQuery = Annotated[
    int, Query(ge=0, le=MAX_INT32, description="only steps after this one"),
]
