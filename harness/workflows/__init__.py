"""Workflows a release ships (search-grounded QA, lesson generation, multi-turn chat), run case by case and
judged by strict checks; `bench=e2e` runs them at a sweep point."""

from __future__ import annotations

from harness.config import WorkflowConfig
from harness.errors import ConfigError
from harness.workflows.base import CaseResult, Workflow


def create_workflow(cfg: WorkflowConfig) -> Workflow:
    """The workflow with its cases loaded and checked (and its corpus indexed); no model is needed."""
    from harness.workflows.chat import ChatGenerate
    from harness.workflows.lesson_pack import LessonPack
    from harness.workflows.search_qa import SearchQA

    kinds: dict[str, type[Workflow]] = {"search_qa": SearchQA, "lesson_pack": LessonPack, "chat": ChatGenerate}
    if cfg.name not in kinds:
        raise ConfigError(
            f"bench=e2e needs a workflow, and workflow={cfg.name!r} is none of {', '.join(kinds)}.",
            "add workflow=search_qa, lesson_pack or chat (or sweep them: -m workflow=search_qa,lesson_pack,chat).",
        )
    return kinds[cfg.name](cfg)


__all__ = ["CaseResult", "Workflow", "create_workflow"]
