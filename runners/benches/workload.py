"""The prompts of a load test, built before a level starts (seeded: a rerun sends requests of the same shape).

- synthetic: prompts of exact token lengths from the built-in text, the length fixed or drawn (uniform or normal
  around bench.prompt_lengths[0]); sent as token ids to /completions, or as text in a user message to chat.
- shared_prefix: one prefix of bench.prefix_tokens shared by every prompt, then a distinct suffix (prefix caches).
- search_qa: the workflow's questions with their retrieved passages, as the workflow sends them (chat messages);
  graded (bench.grade, runners.benches.grading): each answer judged by the workflow's checks, so its length is
  the model's own (bench.max_new_tokens at most), never forced.
- multi_turn: sessions of bench.turns turns; turn t carries the t-1 earlier exchanges, so the context grows turn
  by turn. Canned replies (fixed text of the output length) let every request be built before the level; with
  bench.replies=real each turn carries the server's actual answers and is built when the previous one ends
  (harness.loadgen.sessions), after a think time.
- trace: a production trace's requests (harness.loadgen.traces) at its own times, each prompt built to the trace's
  token count (blocks that share a hash id share their tokens) and its output length forced.
- chat: the chat workflow's conversations as sessions with the server's real replies (a recall check is about what
  the conversation said), each turn graded by the workflow's checks (non-empty, finished, no role leak, the facts it
  must recall); a level sends at least bench.num_requests turns, whole conversations in case order.
- lesson_pack: the LessonPack workflow's topics as it sends them, graded by its checks (sections, exercises,
  answers, length, topic words); natural lengths like search_qa's.
- dataset: real prompts (harness.loadgen.datasets) sampled with the seed, as chat messages; entries with
  `expected_keywords` are graded.

The cache salt (bench.cache_salt=auto) makes every level's prompts its own: a random number drawn once per point
moves where each prompt's text is taken from (token-id prompts keep their exact length) or leads the first message
(text prompts), so no level can be served from the prefix cache an earlier level or point filled. A server with a
cache-salt field of its own (vLLM's `cache_salt`) gets the salt there instead and the prompts stay as they are.
Prompts inside a level still share what the workload shares (a shared prefix, a trace's blocks).
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from typing import TYPE_CHECKING, Any

from harness.config import BenchConfig, WorkflowConfig
from harness.errors import ConfigError
from harness.loadgen.client import Endpoint, request_body
from harness.loadgen.datasets import Dataset, load_dataset
from harness.loadgen.load import Planned
from harness.loadgen.sessions import SessionPlan
from harness.loadgen.traces import Trace, TraceRequest, load_trace
from harness.prompts import exact_prompt
from runners.benches.grading import Expectation

if TYPE_CHECKING:
    from harness.models.loader import LoadedModel

CACHE_BLOCK_TOKENS = 16  # the block a prefix cache reuses (vLLM's default): the unit of the expected cached share


def _need_tokenizer(loaded: LoadedModel, workload: str) -> Any:
    if loaded.tokenizer is None:
        raise ConfigError(
            f"bench.workload={workload} builds prompts of exact token lengths with the model's tokenizer, and model "
            f"'{loaded.name}' has none on this machine.",
            "pick the model entry the server serves, or bench.workload=search_qa (text prompts).",
        )
    return loaded.tokenizer


def read_sources(bench: BenchConfig) -> tuple[Trace | None, Dataset | None]:
    """The trace or dataset the workload replays, read and checked (a ConfigError names the file and row)."""
    if bench.workload == "trace":
        return load_trace(bench.trace), None  # type: ignore[arg-type]
    if bench.workload == "dataset":
        return None, load_dataset(bench.dataset)  # type: ignore[arg-type]
    return None, None


class Workload:
    def __init__(self, bench: BenchConfig, loaded: LoadedModel, endpoint: Endpoint, seed: int) -> None:
        self.bench, self.loaded, self.endpoint, self.seed = bench, loaded, endpoint, seed
        self._questions: list[list[dict[str, str]]] | None = None
        self._conversations: list[dict[str, Any]] | None = None
        self.trace, self.dataset = read_sources(bench)
        self.expectations: list[Expectation] = []  # graded load: what each planned answer is judged against
        self.graded = bench.grade != "off" and self._has_expectations()
        self._salt = secrets.randbits(30) if bench.cache_salt == "auto" else 0
        self.salt = 0  # the current level's
        self._measured = False
        self.clipped: Counter[str] = Counter()

    def describe(self) -> dict[str, Any]:
        b = self.bench
        out: dict[str, Any] = {"workload": b.workload, "api": self.endpoint.api, "max_tokens": b.max_new_tokens,
                               "cache_salt": b.cache_salt}  # fmt: skip
        if b.workload in ("synthetic", "shared_prefix", "multi_turn"):
            out.update(prompt_tokens=b.prompt_lengths[0], length_dist=b.length_dist, length_spread=b.length_spread)
        if b.workload == "shared_prefix":
            out["prefix_tokens"] = b.prefix_tokens
        if b.workload == "multi_turn":
            out["turns"] = b.turns
        if self.trace is not None:
            out["trace"] = {**self.trace.describe(), "speedup": b.trace_speedup, "start_s": b.trace_start_s,
                            "duration_s": b.trace_duration_s, "max_requests": b.trace_requests,
                            "sample": b.trace_sample, "replayed": len(self.trace_window())}  # fmt: skip
        if self.dataset is not None:
            out["dataset"] = {**self.dataset.describe(), "output": b.dataset_output}
        if self._salt:
            out["cache_salt_in"] = "the request's cache_salt field" if self.endpoint.salt_field else "the prompt"
        if self.clipped:
            out["clipped"] = dict(self.clipped)
        return out

    def _has_expectations(self) -> bool:
        if self.bench.workload in ("search_qa", "lesson_pack", "chat"):
            return True
        return self.dataset is not None and any(e.expected_keywords for e in self.dataset.entries)

    def start_level(self, level_index: int) -> None:
        """A new level (0: the warm-up): its own cache salt (none with bench.cache_salt=none)."""
        self.salt = (self._salt * 7919 + level_index * 104_729) % 2**31 if self._salt else 0
        self._measured = level_index > 0

    def _length(self, rng: random.Random) -> int:
        b, mean = self.bench, self.bench.prompt_lengths[0]
        if b.length_dist == "uniform":
            spread = int(mean * b.length_spread)
            return max(1, rng.randint(mean - spread, mean + spread))
        if b.length_dist == "normal":
            return max(1, round(rng.gauss(mean, mean * b.length_spread)))
        return mean

    @property
    def _prompt_salt(self) -> int:
        """The salt the prompts themselves carry: none where the server's own field carries it."""
        return 0 if self.endpoint.salt_field else self.salt

    def _ids(self, n: int, offset: int) -> list[int]:
        return list(exact_prompt(self.loaded, n, offset + self._prompt_salt).ids)

    def _plan(
        self,
        prompt: Any,
        prompt_tokens: int | None,
        max_tokens: int | None = None,
        forced: bool = True,
        case: int | None = None,
    ) -> Planned:
        b = self.bench
        sampling = {"temperature": b.temperature, "top_p": b.top_p, "seed": self.seed}
        max_tokens = max_tokens or b.max_new_tokens
        path, body = request_body(self.endpoint, prompt, max_tokens, max_tokens if forced else 0, **sampling)
        if self.salt and self.endpoint.salt_field:
            body["cache_salt"] = f"harness-{self.salt:08x}"
        return Planned(path, body, max_tokens, prompt_tokens, forced, case)

    def _as_prompt(self, ids: list[int]) -> tuple[Any, int | None]:
        """Token ids for /completions (exact length); a user message of their text for chat (the server's template
        adds its own tokens: the prompt length then comes from usage)."""
        if self.endpoint.api == "completions":
            if self.endpoint.token_prompts:
                return ids, len(ids)
            return self.loaded.tokenizer.decode(ids), None  # a text-only server: its usage gives the length
        text = self.loaded.tokenizer.decode(ids)
        return [{"role": "user", "content": text}], None

    def _salted(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Text prompts carry the level's salt at the start of their first message."""
        if not self._prompt_salt:
            return messages
        first = dict(messages[0], content=f"[{self._prompt_salt:08x}] {messages[0]['content']}")
        return [first, *messages[1:]]

    def plans(self, n: int, level_index: int) -> list[Planned]:
        """n requests for one level; each level draws its own (offset) prompts, the same on every run."""
        b = self.bench
        self.start_level(level_index)
        rng = random.Random(self.seed * 1_000_003 + level_index)
        base = level_index * 10_007
        if b.workload in ("search_qa", "lesson_pack"):
            asked = self._search_qa() if b.workload == "search_qa" else self._lessons()
            # Graded levels ask the same cases in the same order (the salt keeps their prompts apart), so a pass
            # rate that changes with the load is the load's doing, not other questions'.
            start = 0 if self.graded else base
            chosen = [(start + i) % len(asked) for i in range(n)]
            return [self._plan(*self._chat_prompt(self._salted(asked[q])), forced=not self.graded,
                               case=q if self.graded else None) for q in chosen]  # fmt: skip
        if b.workload == "dataset":
            return self._dataset_plans(n, rng)
        if b.workload == "chat":  # whole conversations run as sessions; first turns warm the server up
            return [self.turn(self._chat_opening(self._chat_cases()[i % len(self._chat_cases())])) for i in range(n)]
        _need_tokenizer(self.loaded, b.workload)
        if b.workload == "trace":
            return [self._trace_plan(r, i) for i, r in enumerate(self.trace_window()[:n])]
        if b.workload == "shared_prefix":
            prefix = self._ids(b.prefix_tokens, 0)
            return [self._plan(*self._as_prompt(prefix + self._ids(self._length(rng), base + i + 1))) for i in range(n)]
        if b.workload == "multi_turn":
            return self._multi_turn(n, base, rng)
        return [self._plan(*self._as_prompt(self._ids(self._length(rng), base + i))) for i in range(n)]

    # -- traces -------------------------------------------------------------------------------------------------
    def trace_window(self) -> list[TraceRequest]:
        b = self.bench
        assert self.trace is not None
        return self.trace.window(b.trace_start_s, b.trace_duration_s, b.trace_requests, b.trace_sample, self.seed)

    def trace_offsets(self) -> list[float]:
        """The window's send times, sped up by bench.trace_speedup."""
        return [r.t / self.bench.trace_speedup for r in self.trace_window()]

    def _fit(self, prompt: int, output: int) -> tuple[int, int]:
        """Lengths that fit the model's window: the prompt gives way first; what was cut is counted, never hidden."""
        window = self.loaded.context_window
        if window is None or prompt + output <= window:
            return prompt, output
        new_output = output if output < window // 2 else window // 2
        new_prompt = min(prompt, window - new_output)
        if self._measured:  # the warm-up's requests are not the level's
            self.clipped["requests"] += 1
            self.clipped["prompt_tokens_removed"] += prompt - new_prompt
            self.clipped["output_tokens_removed"] += output - new_output
        return new_prompt, new_output

    def _trace_plan(self, request: TraceRequest, index: int) -> Planned:
        output = request.output_tokens or self.bench.max_new_tokens
        prompt, output = self._fit(request.input_tokens, output)
        if request.hash_ids and self.trace is not None and self.trace.block_tokens:
            block = self.trace.block_tokens
            ids: list[int] = []
            for h in request.hash_ids:  # the same id, the same tokens: the trace's own prefix sharing
                if len(ids) >= prompt:
                    break
                ids += self._ids(block, 1_000_003 + h * 31)
            if len(ids) < prompt:
                ids += self._ids(prompt - len(ids), 7 * index + 3)
            ids = ids[:prompt]
        else:
            ids = self._ids(prompt, 7 * index + 3)
        return self._plan(*self._as_prompt(ids), max_tokens=output)

    # -- datasets -----------------------------------------------------------------------------------------------
    def _dataset_plans(self, n: int, rng: random.Random) -> list[Planned]:
        assert self.dataset is not None
        entries = self.dataset.entries
        order = rng.sample(range(len(entries)), len(entries))
        chosen = [entries[order[i % len(order)]] for i in range(n)]
        forced = self.bench.dataset_output == "forced"
        out = []
        for entry in chosen:
            length = entry.output_tokens
            if forced and length is None and entry.reference and self.loaded.tokenizer is not None:
                length = len(self.loaded.tokenizer(entry.reference, add_special_tokens=False)["input_ids"])
            case = None
            if self.graded and entry.expected_keywords:
                expectation = {"expected_keywords": list(entry.expected_keywords), "min_keywords": entry.min_keywords}
                case = self._expect(Expectation(f"line {entry.row}", expectation, kind="keywords"))
            out.append(self._plan(*self._chat_prompt(self._salted(entry.chat())), max_tokens=length, forced=forced,
                                  case=case))  # fmt: skip
        return out

    def _expect(self, expectation: Expectation) -> int:
        """The expectation's index (each case once)."""
        for i, known in enumerate(self.expectations):
            if known.case_id == expectation.case_id:
                return i
        self.expectations.append(expectation)
        return len(self.expectations) - 1

    # -- conversations ------------------------------------------------------------------------------------------
    def _multi_turn(self, n: int, base: int, rng: random.Random) -> list[Planned]:
        tokenizer = self.loaded.tokenizer
        out: list[Planned] = []
        session = 0
        while len(out) < n:
            history: list[dict[str, str]] = []
            for turn in range(self.bench.turns):
                if len(out) == n:
                    break
                offset = base + session * 100 + turn * 2
                user = tokenizer.decode(self._ids(self._length(rng), offset))
                history.append({"role": "user", "content": user})
                out.append(self._plan(*self._chat_prompt([dict(m) for m in history])))
                reply = tokenizer.decode(self._ids(self.bench.max_new_tokens, offset + 1))
                history.append({"role": "assistant", "content": reply})
            session += 1
        return out

    def sessions(self, n: int, level_index: int) -> list[SessionPlan]:
        """bench.replies=real: n sessions of bench.turns user messages (built-in text of the drawn lengths) and
        their think times (exponential around bench.think_time_s), drawn with the seed."""
        self.start_level(level_index)
        _need_tokenizer(self.loaded, "multi_turn")
        rng = random.Random(self.seed * 1_000_003 + level_index)
        base, turns, mean = level_index * 10_007, self.bench.turns, self.bench.think_time_s
        return [
            SessionPlan(
                [
                    self.loaded.tokenizer.decode(self._ids(self._length(rng), base + s * 100 + t * 2))
                    for t in range(turns)
                ],
                [rng.expovariate(1 / mean) if mean else 0.0 for _ in range(turns)],
            )
            for s in range(n)
        ]

    def chat_sessions(self, n: int, level_index: int) -> list[SessionPlan]:
        """Whole conversations of the chat workflow's built-in cases, in case order from the first (every level
        asks the same ones), until they hold at least n turns; the level's salt leads the system message. Think
        times as for multi_turn's sessions."""
        self.start_level(level_index)
        rng = random.Random(self.seed * 1_000_003 + level_index)
        cases = self._chat_cases()
        out: list[SessionPlan] = []
        turns = 0
        while turns < n:
            case = cases[len(out) % len(cases)]
            users = [t["user"] for t in case["turns"]]
            expected = [
                self._expect(Expectation(f"{case['id']}#{t}", {"expect": turn.get("expect"), "turn": t,
                                                                "turns": len(users)}, kind="chat_turn"))
                for t, turn in enumerate(case["turns"])
            ]  # fmt: skip
            system = self._chat_opening(case)[0]["content"]
            think = [rng.expovariate(1 / self.bench.think_time_s) if self.bench.think_time_s else 0.0 for _ in users]
            out.append(SessionPlan(users, think, system, expected))
            turns += len(users)
        return out

    def _chat_cases(self) -> list[dict[str, Any]]:
        from harness.workflows.chat import ChatGenerate

        if self._conversations is None:
            self._conversations = ChatGenerate(WorkflowConfig(name="chat")).cases
        return self._conversations

    def _chat_opening(self, case: dict[str, Any]) -> list[dict[str, str]]:
        """A conversation's system message (with the level's salt) and first question."""
        from harness.workflows.chat import SYSTEM_PROMPT

        system = {"role": "system", "content": case.get("system", SYSTEM_PROMPT)}
        return self._salted([system, {"role": "user", "content": case["turns"][0]["user"]}])

    def turn(self, history: list[dict[str, str]]) -> Planned:
        """The request that continues a conversation (bench.replies=real)."""
        return self._plan(*self._chat_prompt([dict(m) for m in history]))

    def _search_qa(self) -> list[list[dict[str, str]]]:
        if self._questions is None:
            from harness.workflows.search_qa import SYSTEM_PROMPT, SearchQA, build_messages

            flow = SearchQA(WorkflowConfig(name="search_qa"))
            self._questions = []
            for case in flow.cases:
                sources = [p for p, _ in flow.index.search(case["question"], flow.cfg.top_k)]
                messages = build_messages(case["question"], sources, SYSTEM_PROMPT, flow.cfg.example_turn)
                self._questions.append(messages)
                self.expectations.append(Expectation(case["id"], case, tuple(sources)))  # index = the question's
        return self._questions

    def _lessons(self) -> list[list[dict[str, str]]]:
        """The LessonPack workflow's built-in cases as it sends them; expectations in the same order (a case's
        index is its expectation's, as for search_qa, which a level uses alone)."""
        if self._questions is None:
            from harness.workflows.lesson_pack import SYSTEM_PROMPT, LessonPack, build_messages

            flow = LessonPack(WorkflowConfig(name="lesson_pack"))
            cfg = flow.cfg
            self._questions = []
            for case in flow.cases:
                level, language = case.get("level", "beginner"), case.get("language", "English")
                n_ex = case.get("min_exercises", cfg.min_exercises)
                self._questions.append(build_messages(case["topic"], level, language, n_ex, cfg.max_words,
                                                      SYSTEM_PROMPT, cfg.example_turn))  # fmt: skip
                limits = {"min_exercises": n_ex, "min_words": cfg.min_words, "max_words": cfg.max_words}
                self.expectations.append(Expectation(case["id"], {**case, **limits}, kind="lesson_pack"))
        return self._questions

    def _chat_prompt(self, messages: list[dict[str, str]]) -> tuple[Any, int | None]:
        """Messages for chat; for /completions the same conversation through the model's chat format, as token ids
        (what the in-process engines send), so its length is known."""
        if self.endpoint.api == "chat":
            return messages, None
        from harness.chat import adds_special_tokens, format_chat

        tokenizer = _need_tokenizer(self.loaded, f"{self.bench.workload} with bench.api=completions")
        text, _ = format_chat(messages, self.loaded.chat_format, tokenizer)
        if not self.endpoint.token_prompts:
            return text, None
        ids = tokenizer(text, add_special_tokens=adds_special_tokens(self.loaded.chat_format))["input_ids"]
        return list(ids), len(ids)


def expected_cached_share(plans: list[Planned], tokenizer: Any | None) -> float | None:
    """The share of a level's prompt tokens a prefix cache could serve from the level's own earlier prompts, in
    blocks of CACHE_BLOCK_TOKENS (a block is reusable when the whole prefix up to its end was sent before): the most
    a server's cached share should be when no earlier level or point left its prompts in the cache. None when the
    prompts' tokens are not known here (text prompts without a tokenizer)."""
    seen: set[int] = set()
    reusable = total = 0
    for plan in plans:
        ids = _prompt_ids(plan.body, tokenizer)
        if ids is None:
            return None
        total += len(ids)
        chain = 0
        for end in range(CACHE_BLOCK_TOKENS, len(ids) + 1, CACHE_BLOCK_TOKENS):
            chain = hash((chain, tuple(ids[end - CACHE_BLOCK_TOKENS : end])))
            if chain in seen:
                reusable += CACHE_BLOCK_TOKENS
            else:
                seen.add(chain)
    return reusable / total if total else None


def _prompt_ids(body: dict[str, Any], tokenizer: Any | None) -> list[int] | None:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        return None
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in body.get("messages", []))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
