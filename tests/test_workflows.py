"""The workflows' parts on hand-written inputs: conversation truncation, every check on good and bad outputs,
the case-file loader's messages, the corpus and its retrieval."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import WorkflowConfig
from harness.errors import ConfigError, InferenceError
from harness.workflows import create_workflow, lesson_pack, search_qa
from harness.workflows.chat import judge as judge_chat
from harness.workflows.checks import case_passed, keyword_hits
from harness.workflows.conversation import Conversation
from harness.workflows.corpus import BM25Index, Document, chunk, load_documents
from harness.workflows.fixtures import load_cases
from harness.workflows.lesson_pack import judge as judge_lesson
from harness.workflows.lesson_pack import structure_score
from harness.workflows.search_qa import build_prompt, citations
from harness.workflows.search_qa import judge as judge_qa


def failed(checks):
    return {c.name for c in checks if not c.passed}


# -- conversation manager ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_tokenizer(load):
    return load("tiny-gpt2").tokenizer


def test_plain_conversation_is_the_exact_gpt2_transcript(gpt2_tokenizer):
    c = Conversation(gpt2_tokenizer, "plain", system="Be brief.")
    c.add_user("Hi, I am Ada.")
    c.add_assistant("Hello Ada.")
    c.add_user("Who am I?")
    planned = c.prompt()
    assert (
        planned.text == "System: Be brief.\n\nUser: Hi, I am Ada.\nAssistant: Hello Ada.\nUser: Who am I?\nAssistant:"
    )
    assert planned.stop == ("\nUser:",)
    assert planned.tokens == len(gpt2_tokenizer(planned.text)["input_ids"])
    assert not planned.truncated


def test_chatml_conversation_is_the_exact_qwen_chat_format(gpt2_tokenizer):
    c = Conversation(gpt2_tokenizer, "chatml", system="Be brief.")
    c.add_user("Hi")
    planned = c.prompt()
    assert planned.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert planned.stop == ("<|im_end|>",)


def test_truncation_drops_the_oldest_whole_exchanges_and_says_so(gpt2_tokenizer):
    c = Conversation(gpt2_tokenizer, "plain", system="Keep this system prompt.", budget=60)
    for n in range(6):
        c.add_user(f"Message number {n} says something fairly long about topic {n}.")
        c.add_assistant(f"Reply {n} to that.")
    c.add_user("And now the newest question?")
    planned = c.prompt()
    assert planned.tokens <= 60
    assert planned.truncated and planned.dropped_messages % 2 == 0 and planned.dropped_tokens > 0
    assert planned.messages[0] == {"role": "system", "content": "Keep this system prompt."}
    assert planned.messages[1]["role"] == "user"  # never starts with a reply whose question was dropped
    assert planned.messages[-1]["content"] == "And now the newest question?"
    originals = {m["content"] for m in c.history}
    assert all(m["content"] in originals for m in planned.messages[1:])  # whole turns only
    assert planned.report()["dropped_messages"] == planned.dropped_messages


def test_a_newest_message_over_the_budget_is_refused_with_the_fix(gpt2_tokenizer):
    c = Conversation(gpt2_tokenizer, "plain", budget=16)
    c.add_user("word " * 50)
    with pytest.raises(InferenceError, match="budget"):
        c.prompt()


def test_turns_must_alternate(gpt2_tokenizer):
    c = Conversation(gpt2_tokenizer, "plain")
    with pytest.raises(InferenceError):
        c.add_assistant("no question yet")
    c.add_user("one")
    with pytest.raises(InferenceError):
        c.add_user("two in a row")
    c.add_assistant("reply")
    with pytest.raises(InferenceError, match="no pending user message"):
        c.prompt()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=12),
    budget=st.integers(min_value=40, max_value=300),
)
def test_truncation_always_fits_the_budget_or_refuses(gpt2_tokenizer, lengths, budget):
    c = Conversation(gpt2_tokenizer, "plain", system="System.", budget=budget)
    for n, words in enumerate(lengths[:-1]):
        c.add_user(" ".join(["ask"] * words))
        c.add_assistant(" ".join([f"answer{n}"] * words))
    c.add_user(" ".join(["last"] * lengths[-1]))
    try:
        planned = c.prompt()
    except InferenceError:
        alone = Conversation(gpt2_tokenizer, "plain", system="System.")
        alone.add_user(" ".join(["last"] * lengths[-1]))
        assert alone.prompt().tokens > budget  # refused only when even the newest message cannot fit
        return
    assert planned.tokens <= budget
    assert planned.messages[-1]["content"].startswith("last")
    kept = len(planned.messages) - 1
    assert kept + planned.dropped_messages == len(c.history)


# -- checks ---------------------------------------------------------------------------------------------------
def test_keywords_match_whole_words_and_alternatives():
    assert keyword_hits("It raises NameError.", ["NameError", "nameerror"]) == (["NameError", "nameerror"], [])
    assert keyword_hits("inside the loop", ["in"]) == ([], ["in"])
    assert keyword_hits("It is skipped.", ["skip|skipped"]) == (["skip|skipped"], [])
    assert keyword_hits("pow(2, n) here", ["pow(2, n)"])[0] == ["pow(2, n)"]


def test_a_keyword_of_symbols_matches_next_to_a_digit_or_a_word():
    # Before the fix "%" never matched after a digit: a real lesson on percentages with "25%" was off topic.
    assert keyword_hits("Answer: 0.25 = 25%.", ["percent|%"])[0] == ["percent|%"]
    assert keyword_hits("Write <a href='x'>", ["<a"])[0] == ["<a"]
    assert keyword_hits("a = b @ c", ["@"])[0] == ["@"]
    # and the words around them are still whole words only
    assert keyword_hits("100 percentages", ["percent|%"]) == ([], ["percent|%"])
    assert keyword_hits("name@host", ["@host"])[0] == ["@host"] and keyword_hits("@hosts", ["@host"])[0] == []


# -- SearchQA -------------------------------------------------------------------------------------------------
QA_CASE = {"id": "q", "question": "?", "expected_keywords": ["NameError"], "expected_source": "del"}
SOURCES = [
    chunk([Document("del", "The del statement", "Deleting an unbound name raises NameError.")], 20, 0)[0],
    chunk([Document("naming", "Naming", "Names refer to objects.")], 20, 0)[0],
]


def test_citations_are_parsed_in_every_form():
    assert citations("A [1] and B [2, 3] and C [4][5] but not [x] or [1.5]") == [1, 2, 3, 4, 5]


def test_a_good_cited_answer_passes():
    checks = judge_qa("Deleting an unbound name raises NameError [1].", "eos", QA_CASE, SOURCES)
    assert case_passed(checks) and failed(checks) == set()


@pytest.mark.parametrize(
    ("answer", "finish", "must_fail"),
    [
        ("", "eos", {"non_empty", "cited", "citations_valid", "keywords"}),
        ("It raises NameError.", "eos", {"cited", "citations_valid"}),  # right, but uncited
        ("It raises NameError [3].", "eos", {"citations_valid", "cites_expected_source"}),  # only 2 sources
        ("It raises NameError [1] and [7].", "eos", {"citations_valid"}),
        ("It raises KeyError [1].", "eos", {"keywords"}),
        ("Deleting an unbound name raises NameError [1] and then", "length", {"complete"}),
        ("It raises NameError [2].", "eos", {"cites_expected_source"}),  # cites the wrong source: reported
    ],
)
def test_bad_answers_fail_the_right_checks(answer, finish, must_fail):
    checks = judge_qa(answer, finish, QA_CASE, SOURCES)
    assert must_fail <= failed(checks)
    gating_failures = {c.name for c in checks if c.gates and not c.passed}
    assert case_passed(checks) == (not gating_failures)
    if must_fail != {"cites_expected_source"}:
        assert not case_passed(checks)


def test_a_retrieval_miss_is_reported_but_does_not_fail_a_good_answer():
    checks = judge_qa("Names refer to objects, and del raises NameError [1].", "eos", QA_CASE, SOURCES[1:])
    assert failed(checks) == {"retrieval_hit", "cites_expected_source"} and case_passed(checks)


def test_the_prompt_numbers_its_sources_and_ends_with_the_citation_instruction():
    text = build_prompt("Why?", SOURCES)
    assert "[1] The del statement\n" in text and "[2] Naming\n" in text
    assert text.index("Question: Why?") < text.index("square brackets") and text.endswith("[1].")


def test_the_worked_example_is_itself_an_answer_that_passes_and_is_optional():
    example_case = {"id": "tea", "question": "?", "expected_keywords": ["oxidizing"], "expected_source": "example-tea"}
    checks = judge_qa(search_qa.EXAMPLE_ANSWER, "eos", example_case, search_qa.EXAMPLE_SOURCES)
    assert case_passed(checks) and failed(checks) == set()
    with_example = search_qa.build_messages("Why?", SOURCES, "sys", example_turn=True)
    assert [m["role"] for m in with_example] == ["system", "user", "assistant", "user"]
    assert with_example[-1]["content"] == build_prompt("Why?", SOURCES)
    assert [m["role"] for m in search_qa.build_messages("Why?", SOURCES, "sys", example_turn=False)] == [
        "system",
        "user",
    ]


def _built_in_case(workflow, case_id):
    return next(c for c in create_workflow(WorkflowConfig(name=workflow)).cases if c["id"] == case_id)


# Real answers from Qwen2.5-Coder-1.5B-Instruct (docs/real_model_guide.md, "Fixes that were the harness's fault")
# and hand-written wrong ones: a relaxed check must still fail the wrong answers.
@pytest.mark.parametrize(
    ("case_id", "answer", "passes"),
    [
        # "the next item" is what the documentation says ("continues with the next cycle"): failed before the fix.
        (
            "continue-next",
            "The continue statement skips the rest of the suite and continues with the next item in a loop [2].",
            True,
        ),
        ("continue-next", "The continue statement ends the loop at once [1].", False),
        ("continue-next", "The continue statement skips to the next line after the loop [1].", False),
        ("lambda-statements", "Yes, a function created with a lambda expression can contain statements [2].", False),
        ("none-returned", "The Null Object is returned by functions that do not explicitly return a value [1].", False),
        (
            "power-negative",
            "For int operands of the power operator, the result has the same type as the operands "
            "unless the second argument is negative [1].",
            False,
        ),
    ],
)
def test_real_and_hand_written_answers_on_the_built_in_cases(case_id, answer, passes):
    case = _built_in_case("search_qa", case_id)
    keywords = {c.name: c.passed for c in judge_qa(answer, "eos", case, SOURCES) if c.name == "keywords"}
    assert keywords["keywords"] is passes


# -- LessonPack -----------------------------------------------------------------------------------------------
GOOD_LESSON = """# Python lists

## Objectives
- Create a list and read items by index.
- Add items with append.

## Explanation
A list is an ordered, mutable sequence. You write it with square brackets, and each item has an index
that starts at zero. Lists can hold values of any type, and they grow when you append to them. Because
lists are mutable, a function that receives a list can change it, which is useful and sometimes surprising.
Slicing returns a new list, so the original stays as it was.

## Examples
```python
fruits = ["apple", "pear"]
fruits.append("plum")
print(fruits[0])
```

## Exercises
1. Make a list of three numbers and print the second one.
   Answer: `nums = [1, 2, 3]; print(nums[1])`
2. Append the word "kiwi" to `fruits`.
   Answer: `fruits.append("kiwi")`
3. What index does the first item of a list have?
   Answer: zero.

## Summary
Lists are ordered and mutable; index from zero; add items with append. Slices copy, while methods such as
append change the list in place. Practise with small lists until indexing feels natural to you.
"""


def lesson_checks(text, finish="eos", **kw):
    options = {"min_exercises": 3, "min_words": 80, "max_words": 1500, "expected_keywords": ["list", "append"]}
    return judge_lesson(text, finish, **{**options, **kw})


def test_a_good_lesson_passes_every_check():
    checks = lesson_checks(GOOD_LESSON)
    assert failed(checks) == set() and structure_score(checks) == 1.0


def test_the_lesson_example_passes_every_check_and_shows_the_asked_layout():
    checks = judge_lesson(lesson_pack.EXAMPLE_LESSON, "eos", min_exercises=3, min_words=150, max_words=500)
    assert failed(checks) == set()
    messages = lesson_pack.build_messages("sets", "beginner", "English", 4, 500, "sys", example_turn=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "about: sets." in messages[-1]["content"] and "at least 4 numbered exercises" in messages[-1]["content"]
    assert "under 500 words" in messages[-1]["content"]
    assert len(lesson_pack.build_messages("sets", "beginner", "English", 4, 500, "sys", example_turn=False)) == 2


FRACTIONS_EXERCISES = """## Objectives
- Add fractions.

## Explanation
Fractions with one denominator add by their numerators.

## Examples
1. 1/4 + 1/4 = 2/4 = 1/2.

## Exercises
{exercises}

## Summary
Make the denominators equal, then add the numerators.
"""


@pytest.mark.parametrize(
    ("exercises", "answers"),
    [
        # Qwen2.5-Coder-1.5B's exercises, answered on the exercise's own line: counted 0 before the fix.
        (
            "1. Add 1/5 and 2/5: Answer: 3/5.\n2. Add 1/6 and 1/6: Answer: 2/6 = 1/3.\n"
            "3. Add 1/3 and 1/4: Answer: 7/12.",
            3,
        ),
        ("1. Add 1/5 and 2/5. **Answer:** 3/5\n2. Add 1/6 and 1/6.\nAnswer: 1/3\n3. Add 1/3 and 1/4.", 2),
        # hand-written: the word without the label, or no answer at all, is not an answer
        ("1. Add 1/5 and 2/5, then write the answer in your notebook.\n2. Add 1/6 and 1/6.\n3. Add 1/3 and 1/4.", 0),
        ("1. Add 1/5 and 2/5 (the answer is 3/5).\n2. Add 1/6 and 1/6.\n3. Add 1/3 and 1/4.", 0),
    ],
)
def test_an_answer_is_a_labelled_answer_on_its_own_line_or_after_the_exercise(exercises, answers):
    checks = {c.name: c for c in lesson_checks(FRACTIONS_EXERCISES.format(exercises=exercises), min_words=10,
                                                expected_keywords=["denominator"])}  # fmt: skip
    assert checks["answers"].why.startswith(f"{answers} answer(s)") and checks["answers"].passed is (answers >= 3)


def test_a_code_answer_opened_on_the_answer_line_is_broken_markdown_and_fails():
    # Qwen2.5-Coder-1.5B wrote "Answer: ```sql" (the prompt then asked for both an Answer: line and fenced code):
    # CommonMark renders that as text and pairs the fences wrongly, and the lesson stays a failure.
    broken = (
        "1. Select every row.\nAnswer: ```sql\nSELECT * FROM t;\n```\n2. Count rows.\nAnswer: ```sql\nSELECT 1;\n```"
    )
    # the layout the prompt now asks for; before the counting fix its second exercise was not counted either
    fixed = (
        "1. Select every row.\nAnswer:\n```sql\nSELECT * FROM t;\n```\n2. Count rows.\nAnswer:\n```sql\nSELECT 1;\n```"
    )
    judge = {"min_exercises": 2, "min_words": 10, "expected_keywords": ["SELECT"]}
    assert not case_passed(lesson_checks(FRACTIONS_EXERCISES.format(exercises=broken), **judge))
    assert failed(lesson_checks(FRACTIONS_EXERCISES.format(exercises=fixed), **judge)) == set()
    assert "when an answer is code, write 'Answer:' alone on its line" in lesson_pack.build_prompt(
        "x", "a", "b", 3, 500
    )


def test_answers_in_their_own_section_count():
    text = GOOD_LESSON.replace("   Answer: ", "   ").replace(
        "## Summary", "## Answers\n1. Answer: one.\n2. Answer: two.\n3. Answer: three.\n\n## Summary"
    )
    assert "answers" not in failed(lesson_checks(text))


@pytest.mark.parametrize(
    ("edit", "must_fail"),
    [
        (lambda t: "", {"non_empty", "sections", "exercises", "answers", "length"}),
        (lambda t: t.replace("## Summary", "## Wrap-up"), {"sections"}),
        (lambda t: t.replace("## Examples", "## Samples"), {"sections"}),
        (lambda t: t.split("2. Append")[0] + "## Summary\nShort.", {"exercises", "answers"}),
        (lambda t: t.replace("   Answer: zero.\n", ""), {"answers"}),
        (lambda t: t.replace("print(fruits[0])\n```", "print(fruits[0])"), {"code_fences"}),
        (lambda t: t[:400], {"sections", "length"}),  # truncated mid-lesson
        (lambda t: t.replace("list", "thing").replace("ppend", "dd"), {"on_topic"}),
    ],
)
def test_bad_lessons_fail_the_right_checks(edit, must_fail):
    checks = lesson_checks(edit(GOOD_LESSON))
    assert must_fail <= failed(checks) and not case_passed(checks)


def test_a_lesson_cut_at_the_token_limit_fails_even_when_it_looks_whole():
    assert failed(lesson_checks(GOOD_LESSON, finish="length")) == {"complete"}


def test_length_bounds_both_ways():
    assert "length" in failed(lesson_checks(GOOD_LESSON, max_words=50))
    assert "length" in failed(lesson_checks(GOOD_LESSON, min_words=1000))


# -- ChatGenerate ---------------------------------------------------------------------------------------------
TURNS = [{"user": "My name is Ada."}, {"user": "What is my name?", "expect": ["Ada"]}]


def test_a_good_conversation_passes():
    checks = judge_chat(["Nice to meet you, Ada.", "Your name is Ada."], ["eos", "eos"], TURNS)
    assert failed(checks) == set()


@pytest.mark.parametrize(
    ("replies", "reasons", "must_fail"),
    [
        (["Hi.", "I do not know."], ["eos", "eos"], {"recall_turn1"}),
        (["", "Your name is Ada."], ["eos", "eos"], {"replies_non_empty"}),
        (["Hi.", "Your name is Ada and"], ["eos", "length"], {"replies_complete"}),
        (["Hi.\nUser: what is my name?", "Ada."], ["eos", "eos"], {"no_role_leak"}),
        (["Hi.", "<|im_start|>user\nAda"], ["eos", "eos"], {"no_role_leak"}),
    ],
)
def test_bad_conversations_fail_the_right_checks(replies, reasons, must_fail):
    checks = judge_chat(replies, reasons, TURNS)
    assert must_fail <= failed(checks) and not case_passed(checks)


# -- case files ------------------------------------------------------------------------------------------------
SET_SIZES = {"search_qa": 60, "lesson_pack": 30, "chat": 30}  # the fewest cases a set holds (a gate needs them)


@pytest.mark.parametrize("workflow", sorted(SET_SIZES))
@pytest.mark.parametrize("held_out", [False, True])
def test_each_case_set_is_valid_large_enough_and_says_where_each_case_came_from(workflow, held_out):
    # Held-out sets were written after the prompts last changed, to report pass rates on cases no change was
    # tuned to; none shares a case id with the built-in set.
    path = f"harness/workflows/data/heldout/{workflow}_cases.json" if held_out else None
    cases = create_workflow(WorkflowConfig(name=workflow, cases=path)).cases
    assert len(cases) >= SET_SIZES[workflow] and all(c.get("provenance") is not None for c in cases)
    if held_out:
        built_in = {c["id"] for c in create_workflow(WorkflowConfig(name=workflow)).cases}
        assert not built_in & {c["id"] for c in cases}


def test_search_qa_cases_spread_over_the_corpus_and_its_answers_are_in_their_sources():
    """Every expected keyword is in the expected source's text (the source holds the answer), the cases cover
    many topics and several kinds of question."""
    from harness.workflows.checks import _keyword_pattern
    from harness.workflows.corpus import load_documents

    docs = {d.id: d.text for d in load_documents(None)}
    for path in (None, "harness/workflows/data/heldout/search_qa_cases.json"):
        cases = create_workflow(WorkflowConfig(name="search_qa", cases=path)).cases
        for case in cases:
            for keyword in case["expected_keywords"]:
                assert _keyword_pattern(keyword).search(docs[case["expected_source"]]), (case["id"], keyword)
        assert len({c["expected_source"] for c in cases}) >= 30 and len({c.get("kind") for c in cases}) >= 5


def write(tmp_path, data, name="cases.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ([{"id": "a", "question": "q", "expected_source": "del"}], r"case 0 \('a'\).*'expected_keywords' is missing"),
        (
            [{"id": "a", "question": "q", "expected_keywords": "NameError", "expected_source": "del"}],
            r"case 0 \('a'\): field 'expected_keywords' must be a non-empty list",
        ),
        (
            [{"id": "a", "question": "q", "expected_keywords": ["x"], "expected_source": "del", "sorce": "x"}],
            r"unknown field\(s\) sorce",
        ),
        (
            [{"id": "a", "question": "", "expected_keywords": ["x"], "expected_source": "del"}],
            "field 'question' must be non-empty text",
        ),
        (
            [
                {"id": "a", "question": "q", "expected_keywords": ["x"], "expected_source": "del"},
                {"id": "a", "question": "q", "expected_keywords": ["x"], "expected_source": "del"},
            ],
            r"case 1 \('a'\): the id 'a' is used twice",
        ),
        (["not an object"], "case 0: a case must be a JSON object"),
        ([], "has no cases"),
    ],
)
def test_a_malformed_case_file_names_file_case_and_field(tmp_path, cases, message):
    path = write(tmp_path, {"workflow": "search_qa", "cases": cases})
    with pytest.raises(ConfigError, match=message) as info:
        load_cases(path, "search_qa")
    assert str(path) in info.value.cause


def test_case_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_cases(write(tmp_path, "{oops"), "chat")
    with pytest.raises(ConfigError, match="does not exist"):
        load_cases(tmp_path / "missing.json", "chat")
    with pytest.raises(ConfigError, match="holds cases of workflow 'chat'"):
        load_cases(
            write(tmp_path, {"workflow": "chat", "cases": [{"id": "x", "turns": [{"user": "hi"}]}]}), "search_qa"
        )
    with pytest.raises(ConfigError, match="'cases' list"):
        load_cases(write(tmp_path, [1, 2]), "chat")
    with pytest.raises(ConfigError, match="turn 1: field 'expect' must be a list"):
        load_cases(
            write(tmp_path, {"cases": [{"id": "x", "turns": [{"user": "hi"}, {"user": "a", "expect": "Ada"}]}]}),
            "chat",
        )


def test_users_can_point_a_workflow_at_their_own_cases(tmp_path):
    path = write(tmp_path, {"workflow": "lesson_pack", "cases": [{"id": "x", "topic": "tides", "min_exercises": 2}]})
    workflow = create_workflow(WorkflowConfig(name="lesson_pack", cases=str(path)))
    assert [c["id"] for c in workflow.cases] == ["x"] and workflow.cases_file == path


def test_limit_takes_the_first_cases():
    assert [c["id"] for c in create_workflow(WorkflowConfig(name="chat", limit=2)).cases] == [
        "name-recall",
        "city-recall",
    ]


# -- corpus and retrieval ----------------------------------------------------------------------------------------
def test_a_folder_corpus_reads_md_txt_and_jsonl(tmp_path):
    (tmp_path / "guides").mkdir()
    (tmp_path / "guides" / "tides.md").write_text("# Tides\nThe moon pulls the oceans, which makes tides.")
    (tmp_path / "volcano.txt").write_text("Volcanoes erupt molten rock called lava.")
    (tmp_path / "more.jsonl").write_text('{"id": "glacier", "text": "Glaciers are rivers of ice."}\n\n')
    (tmp_path / "ignored.csv").write_text("a,b")
    docs = load_documents(str(tmp_path))
    assert {d.id for d in docs} == {"guides/tides", "volcano", "glacier"}
    index = BM25Index(chunk(docs, 50, 10))
    assert index.search("what makes tides in the ocean", 1)[0][0].doc_id == "guides/tides"
    assert index.search("the of and", 3) == []  # only stopwords: nothing to match


def test_bad_corpora_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="has no documents"):
        load_documents(str(tmp_path))
    with pytest.raises(ConfigError, match="is not a folder"):
        load_documents(str(tmp_path / "nowhere"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": 3}\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_documents(str(tmp_path))


def test_a_case_whose_expected_source_is_not_in_the_corpus_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tides.md").write_text("The moon pulls the oceans.")
    cases = write(
        tmp_path, {"cases": [{"id": "q1", "question": "q", "expected_keywords": ["moon"], "expected_source": "tide"}]}
    )
    with pytest.raises(ConfigError, match=r"case 'q1': expected_source 'tide' is not a document.*Close ids: tides"):
        create_workflow(WorkflowConfig(name="search_qa", cases=str(cases), corpus=str(corpus)))


def test_chunks_cover_a_document_with_overlap():
    doc = Document("d", "D", " ".join(f"w{i}" for i in range(100)))
    passages = chunk([doc], 40, 10)
    assert [p.id for p in passages] == ["d#0", "d#1", "d#2"]
    assert passages[1].text.split()[0] == "w30" and passages[-1].text.split()[-1] == "w99"


def test_bm25_finds_the_expected_topic_for_nearly_every_built_in_case():
    workflow = create_workflow(WorkflowConfig(name="search_qa"))
    hits = [
        c["expected_source"] in {p.doc_id for p, _ in workflow.index.search(c["question"], 3)} for c in workflow.cases
    ]
    assert sum(hits) / len(hits) >= 0.9


def test_workflow_none_with_bench_e2e_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a workflow"):
        create_workflow(WorkflowConfig(name="none"))
