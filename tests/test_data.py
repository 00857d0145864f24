"""data.py: every shared benchmark/training file through its config, field mapping, limits, and error messages."""

import json
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir

from tip_cli.config.compose import CONF_DIR, register, validate
from tip_cli.config.schema import ConfigError, DatasetConfig
from tip_cli.data import Problem, fit_context, load_problems

REPO = CONF_DIR.parent
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "math500.jsonl").is_file(), reason=f"{SHARED} not present")
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def composed(overrides: list[str]):
    register()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return validate(compose("config", overrides=overrides))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_shared
@pytest.mark.parametrize(
    ("bench_name", "records", "n", "temperature"),
    [("math500", 500, 1, 0.0), ("aime24", 30, 8, 0.6), ("aime25", 30, 8, 0.6)],
)
def test_benchmark_configs_load_the_shared_files(bench_name, records, n, temperature, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' offline path is relative to where tip runs
    path = f"../shared/data/{bench_name}.jsonl"
    cfg = composed([f"benchmark={bench_name}", "benchmark.hf_id=null", f"benchmark.path={path}"]).benchmark
    assert (cfg.n, cfg.temperature) == (n, temperature)
    problems = load_problems(cfg)
    rows = read_jsonl(SHARED / f"{bench_name}.jsonl")
    assert len(problems) == len(rows) == records
    for p, row in zip(problems, rows, strict=True):
        assert p.id == row["id"]  # math500's unique_id equals its id
        assert (p.problem, p.answer) == (row["problem"], row["answer"])
        assert p.prompt == row["problem"] + INSTRUCTION
        assert "problem" not in p.meta and "answer" not in p.meta
    if bench_name == "math500":
        assert {p.meta["subject"] for p in problems} >= {"Algebra", "Geometry", "Precalculus"}
        assert {p.meta["level"] for p in problems} == {1, 2, 3, 4, 5}


@needs_shared
@pytest.mark.parametrize(("data", "records"), [("math_train", 7470), ("aime_1983_2023", 975)])
def test_data_configs_load_the_shared_files(data, records, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = composed([f"data={data}"]).data
    problems = load_problems(cfg)
    assert len(problems) == records
    first = read_jsonl(SHARED / f"{data}.jsonl")[0]
    assert (problems[0].id, problems[0].answer) == (first["id"], first["answer"])
    assert problems[0].prompt.endswith(INSTRUCTION)


def test_hub_configs_name_their_datasets(monkeypatch):
    """The hub sources reach datasets.load_dataset with their id, config and split (no network: it is faked)."""
    calls = []

    def fake_load_dataset(hf_id, hf_config, split):
        calls.append((hf_id, hf_config, split))
        return datasets.Dataset.from_list(
            [
                {
                    "problem": "1+1?",
                    "answer": "2",
                    "unique_id": "u0",
                    "id": 60,
                    "prompt": [{"role": "user", "content": "1+1?"}],
                    "reward_model": {"ground_truth": "2"},
                    "extra_info": {"index": "abc"},
                },
            ]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ids = {}
    for group, option in [
        ("benchmark", "math500"),
        ("benchmark", "aime24"),
        ("benchmark", "aime25"),
        ("data", "dapo_math_17k"),
    ]:
        cfg = getattr(composed([f"{group}={option}"]), group)
        [p] = load_problems(cfg)
        assert (p.problem, p.answer) == ("1+1?", "2")
        ids[option] = p.id
    assert [c[0] for c in calls] == [
        "HuggingFaceH4/MATH-500",
        "HuggingFaceH4/aime_2024",
        "math-ai/aime25",
        "BytedTsinghua-SIA/DAPO-Math-17k",
    ]
    assert ids == {"math500": "u0", "aime24": "60", "aime25": "60", "dapo_math_17k": "abc"}


def test_field_mapping_nested_fields_and_meta(tmp_path):
    rows = [
        {"q": f"What is {i}+{i}?", "sol": {"final": 2 * i}, "key": f"k{i}", "tags": ["easy"], "level": i}
        for i in range(5)
    ]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "set.parquet")
    cfg = DatasetConfig(
        name="t",
        path=str(tmp_path / "set.parquet"),
        problem_field="q",
        answer_field="sol.final",
        id_field="key",
        prompt_template="Q: {problem} A: \\boxed{{}}",
    )
    problems = load_problems(cfg)
    assert problems[3] == Problem(
        id="k3",
        problem="What is 3+3?",
        answer="6",
        prompt="Q: What is 3+3? A: \\boxed{}",
        meta={"tags": ["easy"], "level": 3},
        where=f"{tmp_path / 'set.parquet'} row index 3",
    )


def test_json_list_file_and_ids_from_the_index(tmp_path):
    (tmp_path / "set.json").write_text(
        json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    )
    # id_field defaults to "id", which these rows lack
    problems = load_problems(DatasetConfig(name="t", path=str(tmp_path / "set.json")))
    assert [(p.id, p.problem, p.answer) for p in problems] == [("0", "a", "1"), ("1", "b", "2")]
    problems = load_problems(DatasetConfig(name="t", path=str(tmp_path / "set.json"), id_field=None))
    assert [p.id for p in problems] == ["0", "1"]


def test_limit(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"x{i}", "problem": str(i), "answer": str(i)}) + "\n" for i in range(7))
    )
    cfg = DatasetConfig(name="t", path=str(path))
    assert [p.id for p in load_problems(cfg, limit=3)] == ["x0", "x1", "x2"]
    assert len(load_problems(cfg, limit=100)) == 7
    assert len(load_problems(cfg)) == 7


def test_relative_path_resolves_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "set.jsonl").write_text(json.dumps({"id": "a", "problem": "p", "answer": "1"}) + "\n")
    monkeypatch.chdir(tmp_path / "sub")
    assert load_problems(DatasetConfig(name="t", path="../sub/set.jsonl"))[0].id == "a"


def test_missing_file_names_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        load_problems(DatasetConfig(name="math500", path="data/nope.jsonl"))
    assert str(tmp_path / "data" / "nope.jsonl") in str(err.value)
    assert "benchmark.path=" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_field_lists_the_available_ones(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "p", "answer": "1", "subject": "s"}) + "\n")
    with pytest.raises(ConfigError) as err:
        load_problems(DatasetConfig(name="t", path=str(path)))  # problem_field defaults to "problem"
    assert "'problem'" in str(err.value)
    assert "id, question, answer, subject" in str(err.value)
    # a wrong field name is the config's fault, not a row's: it fails even when bad rows are skipped
    with pytest.raises(ConfigError, match="solution.final"):
        load_problems(
            DatasetConfig(name="t", path=str(path), problem_field="question", answer_field="solution.final"),
            skip_bad_rows=True,
        )


def test_unknown_file_type_and_bad_template(tmp_path):
    (tmp_path / "set.csv").write_text("problem,answer\np,1\n")
    with pytest.raises(ValueError, match=".jsonl"):
        load_problems(DatasetConfig(name="t", path=str(tmp_path / "set.csv")))
    (tmp_path / "set.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="literal braces"):
        load_problems(
            DatasetConfig(name="t", path=str(tmp_path / "set.jsonl"), prompt_template="{problem} \\boxed{}")
        )


def test_toy_source_goes_through_toy_path(tmp_path, monkeypatch):
    import tip_cli.toy.build

    (tmp_path / "test.jsonl").write_text(
        json.dumps({"id": "toy-0", "problem": "Ann has 2.", "answer": "2"}) + "\n"
    )
    kinds = []
    monkeypatch.setattr(
        tip_cli.toy.build,
        "toy_path",
        lambda kind, seed=0: kinds.append(kind) or tmp_path / f"{kind}.jsonl",
        raising=False,
    )
    [p] = load_problems(DatasetConfig(name="toy", path="toy://test"))
    assert kinds == ["test"]
    assert (p.id, p.problem, p.answer, p.prompt) == ("toy-0", "Ann has 2.", "2", "Ann has 2.")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def warnings(capsys) -> list[str]:
    """load_problems's lines on stderr, without the progress bars of `datasets`."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


GOOD = json.dumps({"problem": "p", "answer": "1"})


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"problem": "p", "answer": ', "not valid JSON"),
        ("[1, 2]", "an array, not an object"),
        ('"just a string"', "a string, not an object"),
        (json.dumps({"problem": "p"}), "answer field 'answer' is missing or null"),
        (json.dumps({"problem": "p", "answer": None}), "answer field 'answer' is missing or null"),
        (json.dumps({"problem": " ", "answer": "1"}), "problem field 'problem' is empty"),
    ],
)
def test_malformed_jsonl_row_fails_with_its_line(tmp_path, bad_line, what):
    path = write_lines(tmp_path / "set.jsonl", [GOOD, "", bad_line, GOOD])  # the blank line still counts
    with pytest.raises(ValueError) as err:
        load_problems(DatasetConfig(name="t", path=str(path)))
    message = str(err.value)
    assert f"{path} line 3: {what}" in message
    assert "eval.skip_bad_rows=true" in message and "\n" not in message


def test_skip_bad_rows_reports_each_line_and_keeps_the_rest(tmp_path, capsys):
    path = write_lines(
        tmp_path / "set.jsonl",
        [
            json.dumps({"problem": "a", "answer": "1"}),
            "[1, 2]",
            json.dumps({"problem": "c", "answer": ""}),
            "{not json",
            json.dumps({"problem": "e", "answer": 5}),
        ],
    )
    problems = load_problems(DatasetConfig(name="t", path=str(path)), skip_bad_rows=True)
    # ids number the rows as they stand in the file, so skipping does not renumber the good ones
    assert [(p.id, p.problem, p.answer) for p in problems] == [("0", "a", "1"), ("4", "e", "5")]
    lines = warnings(capsys)
    assert [line.split(": ", 2)[2].split(":")[0] for line in lines[:3]] == [
        f"skipped {path} line {n}" for n in (2, 3, 4)
    ]
    assert "skipped 3 malformed row(s)" in lines[3] and "kept 2" in lines[3]
    assert len(lines) == 4
    # limit counts good problems
    limited = load_problems(DatasetConfig(name="t", path=str(path)), limit=2, skip_bad_rows=True)
    assert [p.id for p in limited] == ["0", "4"]


def test_valid_file_loads_the_same_with_skip_bad_rows(tmp_path, capsys):
    rows = [json.dumps({"id": f"x{i}", "problem": "p", "answer": i}) for i in range(3)]
    path = write_lines(tmp_path / "set.jsonl", rows)
    cfg = DatasetConfig(name="t", path=str(path))
    assert load_problems(cfg, skip_bad_rows=True) == load_problems(cfg)
    assert warnings(capsys) == []


def test_bad_parquet_row_is_named_by_its_row_index(tmp_path, capsys):
    path = tmp_path / "set.parquet"
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]
    datasets.Dataset.from_list(rows).to_parquet(path)
    cfg = DatasetConfig(name="t", path=str(path))
    with pytest.raises(ValueError, match=f"{path} row index 1: answer field 'answer' is missing or null"):
        load_problems(cfg)
    assert [p.problem for p in load_problems(cfg, skip_bad_rows=True)] == ["a"]
    assert f"{path} row index 1" in warnings(capsys)[0]


def test_broken_json_array_names_its_line(tmp_path):
    path = tmp_path / "set.json"
    path.write_text('[{"problem": "a", "answer": "1"},\n {"problem": "b" "answer": "2"}]\n')
    with pytest.raises(ValueError, match=f"{path} line 2: not valid JSON"):
        load_problems(DatasetConfig(name="t", path=str(path)), skip_bad_rows=True)


def test_nothing_to_load(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="it has no rows"):
        load_problems(DatasetConfig(name="t", path=str(empty)))
    bad = write_lines(tmp_path / "bad.jsonl", ["[]", json.dumps({"problem": "p", "answer": None})])
    with pytest.raises(ValueError, match="all 2 rows are malformed"):
        load_problems(DatasetConfig(name="t", path=str(bad)), skip_bad_rows=True)


def test_unknown_hub_id_fails_at_once_with_a_local_file_hint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # both libraries read it at import, so set their flags too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as err:
        load_problems(DatasetConfig(name="b", path=None, hf_id="nobody/no-such-set"))
    message = str(err.value)
    assert "'nobody/no-such-set'" in message and "Hugging Face Hub" in message and "offline" in message
    assert "benchmark.path=" in message and "\n" not in message
    assert err.value.__cause__ is not None


def test_fit_context_keeps_prompts_that_leave_room_to_answer(tmp_path, capsys):
    path = write_lines(tmp_path / "set.jsonl", [json.dumps({"problem": "x" * n, "answer": "1"}) for n in (4, 6, 7, 2)])
    problems = load_problems(DatasetConfig(name="t", path=str(path), prompt_template="{problem}"))
    count = len  # a prompt of n characters "has" n tokens here: 4 + 6 = 10 fits a context of 10, 7 + 6 does not

    with pytest.raises(ValueError) as err:
        fit_context(problems, lambda p: count(p.prompt), 10, 6, "t", skip_bad_rows=False, skip_key="train.skip_bad_rows")
    message = str(err.value)
    assert f"{path} line 2: the prompt has 6 tokens" in message and "context of 10" in message
    assert "train.skip_bad_rows=true" in message and "\n" not in message
    kept, skipped = fit_context(problems, lambda p: count(p.prompt), 10, 6, "t", skip_bad_rows=True)
    assert [len(p.prompt) for p in kept] == [4, 2] and skipped == 2
    err = capsys.readouterr().err
    assert f"{path} line 2" in err and f"{path} line 3" in err and "skipped 2 row(s) too long" in err
    with pytest.raises(ValueError, match="no row fits"):
        fit_context(problems, lambda p: count(p.prompt), 7, 6, "t", skip_bad_rows=True)
