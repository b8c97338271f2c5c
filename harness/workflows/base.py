"""What every workflow shares: its cases (loaded and checked before any model loads), one record per case,
and the way a case's requests are sent (streamed, so each has its timestamps)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import WorkflowConfig
from harness.engines.base import Engine, Generation, GenerationParams
from harness.workflows.checks import Check, case_passed
from harness.workflows.fixtures import load_cases

DATA_DIR = Path(__file__).resolve().parent / "data"  # the built-in and held-out case files

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel


def with_example(system: str, example: tuple[str, str] | None, request: str) -> list[dict[str, str]]:
    """The messages of one request: the system prompt, then (when given) a worked exchange, then the request."""
    shown = [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}] if example else []
    return [{"role": "system", "content": system}, *shown, {"role": "user", "content": request}]


def default_cases_file(workflow: str) -> Path:
    """The built-in cases of a workflow: harness/workflows/data/<workflow>_cases.json."""
    return DATA_DIR / f"{workflow}_cases.json"


@dataclass
class CaseResult:
    id: str
    input: dict[str, Any]
    output: Any  # the answer text, or one text per turn
    checks: list[Check]
    requests: list[Generation] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # what the workflow adds (sources, truncation, scores)

    @property
    def passed(self) -> bool:
        return case_passed(self.checks)

    def record(self, workflow: str) -> dict[str, Any]:
        """One JSONL line: input, output, each check with why, and the timings of each request."""
        return {
            "workflow": workflow,
            "id": self.id,
            "passed": self.passed,
            "input": self.input,
            "output": self.output,
            "checks": [c.record() for c in self.checks],
            "requests": [
                {
                    "prompt_tokens": g.prompt_tokens,
                    "output_tokens": g.output_tokens,
                    "finish_reason": g.finish_reason,
                    "ttft_ms": latency["ttft_s"] * 1e3 if latency else None,
                    "e2e_ms": latency["e2e_s"] * 1e3 if latency else (g.end_ns - g.start_ns) / 1e6,
                }
                for g, latency in ((g, g.latency()) for g in self.requests)
            ],
            **self.extra,
        }


class Workflow(ABC):
    """A workflow's cases and how to run and judge one of them."""

    name: str

    def __init__(self, cfg: WorkflowConfig) -> None:
        self.cfg = cfg
        self.cases_file = Path(cfg.cases).expanduser() if cfg.cases else default_cases_file(self.name)
        cases = load_cases(self.cases_file, self.name)
        self.cases = cases[: cfg.limit] if cfg.limit else cases

    @abstractmethod
    def run_case(
        self, case: dict[str, Any], engine: Engine, loaded: LoadedModel, params: GenerationParams
    ) -> CaseResult: ...

    def metrics(self, results: list[CaseResult]) -> dict[str, list[bool] | list[float]]:
        """Workflow-specific fractions over the cases that ran: pass/fail flags (a proportion, with a Wilson
        interval) or per-case scores in [0, 1]."""
        return {}
