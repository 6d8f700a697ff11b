"""A metadata store that keeps everything in this process (its artifact store is in
`_memory_artifacts`, re-exported here)."""

from __future__ import annotations

from flowcore._models import ArtifactVersion, PipelineRun, RunStatus, StepRun, StepStatus
from flowcore.exceptions import (
    ArtifactLoadError,
    RunNameConflictError,
    RunNotFoundError,
)
from flowcore.stores._base import MetadataStore
from flowcore.stores._memory_artifacts import InMemoryArtifactStore

__all__ = ["InMemoryArtifactStore", "InMemoryMetadataStore"]


class InMemoryMetadataStore(MetadataStore):
    """Runs and the cache index held in dictionaries; the run objects are shared, not copied."""

    def __init__(self) -> None:
        self._runs: dict[str, PipelineRun] = {}
        self._names: dict[str, str] = {}
        self._artifacts: dict[str, ArtifactVersion] = {}
        self._cache: dict[str, StepRun] = {}
        self._cache_pipeline: dict[str, str] = {}
        # (pipeline name, invocation ID) -> (run id, cache key components) of the newest
        # finished step run that has them: explains a miss without scanning every run.
        self._components: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_run(self, run: PipelineRun) -> None:
        if run.name in self._names:
            raise RunNameConflictError(
                f"run name '{run.name}' is already used (pipeline '{run.pipeline_name}'); "
                "choose another run_name or add a placeholder such as {time} or {run_id}"
            )
        self._names[run.name] = run.id
        self._runs[run.id] = run

    async def update_run(self, run: PipelineRun) -> None:
        return None

    async def update_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        self.record_step_run(run, step_run)

    def record_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        if step_run.cache_components is not None and step_run.status.is_finished:
            self._components[(run.pipeline_name, step_run.name)] = (
                run.id, step_run.cache_components)
        if step_run.status is StepStatus.COMPLETED:
            for art in step_run.outputs.values():
                self._artifacts[art.id] = art
            if step_run.cache_key is not None:
                self._cache[step_run.cache_key] = step_run
                self._cache_pipeline[step_run.cache_key] = run.pipeline_name

    async def get_run(self, name_or_id: str) -> PipelineRun:
        run_id = self._names.get(name_or_id, name_or_id)
        try:
            return self._runs[run_id]
        except KeyError:
            raise RunNotFoundError(f"no pipeline run named or with id '{name_or_id}'") from None

    async def list_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        wanted = RunStatus(status) if status is not None else None
        out = [
            r
            for r in reversed(self._runs.values())
            if not r.unlisted
            and (pipeline_name is None or r.pipeline_name == pipeline_name)
            and (wanted is None or r.status is wanted)
        ]
        return out[:limit]

    async def get_step_logs(self, step_run_id: str) -> str:
        for run in self._runs.values():
            for sr in run.steps.values():
                if sr.id == step_run_id:
                    return sr.logs or ""
        return ""

    async def get_artifact(self, artifact_id: str) -> ArtifactVersion:
        try:
            return self._artifacts[artifact_id]
        except KeyError:
            raise ArtifactLoadError(f"no artifact version with id '{artifact_id}'") from None

    async def find_cached(self, cache_key: str) -> StepRun | None:
        return self._cache.get(cache_key)

    async def find_latest_cache_components(self, pipeline_run_id: str, step_name: str
                                           ) -> dict[str, str] | None:
        current = self._runs.get(pipeline_run_id)
        if current is None:
            return None
        found = self._components.get((current.pipeline_name, step_name))
        if found is None or found[0] == pipeline_run_id:
            return None
        return found[1]

    async def delete_run(self, name_or_id: str) -> None:
        run = await self.get_run(name_or_id)
        del self._runs[run.id]
        self._names.pop(run.name, None)
        for key in [k for k, s in self._cache.items() if s.pipeline_run_id == run.id]:
            del self._cache[key]
            self._cache_pipeline.pop(key, None)

    async def clear_cache(self, pipeline_name: str | None = None) -> int:
        keys = [
            k for k in self._cache
            if pipeline_name is None or self._cache_pipeline.get(k) == pipeline_name
        ]
        for k in keys:
            del self._cache[k]
            self._cache_pipeline.pop(k, None)
        return len(keys)
