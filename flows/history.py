"""Read flow runs, task runs and artifacts back from the Prefect API, for `alignflow runs`."""

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort

from tasks.store import InputError


def _seconds(run) -> float | None:
    return round(run.total_run_time.total_seconds(), 3) if run.total_run_time is not None else None


def flow_runs(limit: int) -> list[dict]:
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=limit, sort=FlowRunSort.START_TIME_DESC)
    return [
        {"id": str(r.id), "name": r.name, "state": r.state_name, "start": r.start_time, "seconds": _seconds(r)}
        for r in runs
    ]


def flow_run_detail(run_id: str) -> dict:
    try:
        uid = UUID(run_id)
    except ValueError:
        raise InputError(f"{run_id!r} is not a flow run id (see `alignflow runs`)") from None
    with get_client(sync_client=True) as client:
        flows = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uid])))
        if not flows:
            raise InputError(f"no flow run {run_id}")
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uid])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uid])))
    flow = flows[0]
    return {
        "id": str(flow.id),
        "name": flow.name,
        "state": flow.state_name,
        "tasks": [{"name": t.name, "state": t.state_name, "seconds": _seconds(t)}
                  for t in sorted(tasks, key=lambda t: t.start_time or t.created)],
        "artifacts": [{"key": a.key, "type": a.type, "description": a.description, "data": a.data} for a in artifacts],
    }
