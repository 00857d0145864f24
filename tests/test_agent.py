"""Agentic rollouts: the Hermes tool-call parser, the model-token mask, and OPD steps on the embedded tool-use env."""

import json
from unittest.mock import patch

import pytest
import torch

from tip_cli.cli import compose_config
from tip_cli.config.schema import AgentConfig, ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import ToolCall
from tip_cli.envs.toy_agent import ToyAgentEnv, ToyAgentEpisode, calculate, generate_tasks
from tip_cli.eval.benchmark import EnvBenchmark, eval_spec, evaluate_benchmark
from tip_cli.pairs import load_pair
from tip_cli.rollout import agent
from tip_cli.rollout.batch import Generation, Sampling
from tip_cli.seeds import derive_seed
from tip_cli.toy.agent_pair import build_micro_agent_pair, make_tokenizer
from tip_cli.tracking import read_jsonl
from tip_cli.train import parallel, recipe
from tip_cli.train import step as train_step

CALL = '<tool_call>\n{"name": "lookup", "arguments": {"item": "apples"}}\n</tool_call>'


@pytest.fixture(scope="session")
def micro_agent(tmp_path_factory):
    teacher, student = build_micro_agent_pair(tmp_path_factory.mktemp("micro_agent"))
    return {"teacher": teacher, "student": student}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(generate_tasks(100, seed=0))


def test_parser_reads_well_formed_calls_in_order():
    text = f'Let me check.\n{CALL}\n<tool_call>{{"name": "calculator", "arguments": "{{\\"expression\\": \\"1 + 2\\"}}"}}</tool_call>'
    calls = agent.parse_tool_calls(text)
    assert calls == [ToolCall("lookup", {"item": "apples"}), ToolCall("calculator", {"expression": "1 + 2"})]
    assert agent.parse_tool_calls("She pays \\boxed{7}.") == []


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "lookup", "arguments": {"item": "apples"}</tool_call>', "not valid JSON"),
    ('<tool_call>{"name": "lookup", "arguments": {"item": "apples"}}', "not closed"),
    ('<tool_call>["lookup"]</tool_call>', "JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', "JSON object"),
    ('<tool_call>{"name": "lookup", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
])
def test_parser_flags_malformed_calls(text, error):
    (call,) = agent.parse_tool_calls(text)
    assert call.error is not None and error in call.error


def test_malformed_and_bad_calls_become_error_messages_not_exceptions():
    task = generate_tasks(1, seed=0)[0]
    ep = ToyAgentEpisode(task)
    (bad_json,) = agent.parse_tool_calls('<tool_call>{"name": </tool_call>')
    assert ep.step(bad_json).startswith("Error: the tool call is not valid JSON")
    assert ep.step(ToolCall("search", {})).startswith("Error: unknown tool 'search'")
    assert ep.step(ToolCall("lookup", {})).startswith("Error: lookup failed")  # missing argument
    assert ep.step(ToolCall("calculator", {"expression": "2 ** 10"})).startswith("Error: calculator failed")
    assert ep.step(ToolCall("lookup", {"item": "dragons"})) == "Error: no price for 'dragons' in this shop"
    item = next(iter(task.meta["prices"]))
    assert ep.step(ToolCall("lookup", {"item": item})) == str(task.meta["prices"][item])


def test_calculator_and_scoring():
    assert calculate("3 * 4 + 2 * (7 - 1)") == 24
    assert calculate("-2 + 5") == 3
    with pytest.raises(ValueError):
        calculate("__import__('os')")
    task = generate_tasks(1, seed=0)[0]
    ep, answer = ToyAgentEpisode(task), task.meta["answer"]
    assert answer == sum(q * task.meta["prices"][item] for item, q in task.meta["bought"])
    assert ep.score(f"So \\boxed{{{answer + 1}}} no, \\boxed{{{answer}}}.") == {"accuracy": 1.0}
    assert ep.score(f"\\boxed{{{answer + 1}}}") == {"accuracy": 0.0}
    assert ep.score("") == {"accuracy": 0.0}


class ScriptedEngine:
    """Returns the next scripted turn (text + EOS) for every episode still running."""

    def __init__(self, tok, turns: list[str], eos: bool = True):
        self.tok, self.turns, self.eos, self.prompts, self.seeds = tok, turns, eos, [], []

    def generate(self, prompts, sampling):
        self.prompts.append(prompts)
        self.seeds.append(sampling.seed)
        text = self.turns[len(self.prompts) - 1]
        ids = self.tok(text + (self.tok.eos_token if self.eos else ""), add_special_tokens=False)["input_ids"]
        return Generation([list(ids) for _ in prompts])


def run_script(tok, turns, task, seed=None, **agent_kw):
    env = ToyAgentEnv(DatasetConfig(name="t", env="toy_agent", path="toy_agent://train"))
    engine = ScriptedEngine(tok, turns)
    cfg = AgentConfig(**({"max_turns": 10, "max_tokens": 1000} | agent_kw))
    (traj,) = agent.rollout(engine, tok, env, [task], Sampling(n=1, seed=seed), cfg, PairConfig(), {tok.eos_token_id})
    return traj, engine


def test_rollout_is_the_rendered_conversation_and_masks_only_model_tokens(tok):
    task = next(t for t in generate_tasks(20, seed=0) if len(t.meta["bought"]) == 1)
    (item, q), = task.meta["bought"]
    price, answer = task.meta["prices"][item], task.meta["answer"]
    call = f'<tool_call>\n{{"name": "lookup", "arguments": {{"item": "{item}"}}}}\n</tool_call>'
    broken = '<tool_call>\n{"name": "calculator", "arguments": {"expression": </tool_call>'
    turns = [call, broken, f"It is \\boxed{{{answer}}}."]
    traj, _ = run_script(tok, turns, task)
    # independent reference: the chat template rendering the whole conversation at once
    error = agent.parse_tool_calls(broken)[0].error
    conversation = [
        {"role": "user", "content": task.prompt}, {"role": "assistant", "content": call},
        {"role": "tool", "content": str(price)}, {"role": "assistant", "content": broken},
        {"role": "tool", "content": f"Error: {error}"}, {"role": "assistant", "content": turns[2]},
    ]
    tools = ToyAgentEpisode(task).tools
    expected = tok.apply_chat_template(conversation, tools=tools, tokenize=False).removesuffix("\n")
    assert tok.decode(traj.ids) == expected
    model_text = tok.decode([t for t, m in zip(traj.ids, traj.model_mask, strict=True) if m])
    assert model_text == "".join(t + tok.eos_token for t in turns)
    other_text = tok.decode([t for t, m in zip(traj.ids, traj.model_mask, strict=True) if not m])
    assert f"<tool_response>\n{price}\n</tool_response>" in other_text and error in other_text
    assert (traj.turns, traj.tool_calls, traj.tool_errors, traj.answered) == (3, 2, 1, True)
    assert traj.metrics == {"accuracy": 1.0}
    batch = agent.pack([traj], tok.pad_token_id)
    targets = batch.input_ids[0, 1:][batch.target_mask[0, :-1]]  # the tokens the target positions predict
    assert tok.decode(targets.tolist()) == model_text


def test_rollout_stops_at_max_turns_and_max_tokens(tok):
    task = generate_tasks(1, seed=0)[0]
    traj, engine = run_script(tok, [CALL] * 10, task, max_turns=3)
    assert traj.turns == 3 == len(engine.prompts) and not traj.answered and traj.metrics == {"accuracy": 0.0}
    ep = ToyAgentEpisode(task)
    prompt = len(agent.render_chat(tok, ep.messages, ep.tools, PairConfig()))
    call = len(tok(CALL + tok.eos_token, add_special_tokens=False)["input_ids"])
    result = len(agent.tool_turn_ids(tok, [ep.step(agent.parse_tool_calls(CALL)[0])], PairConfig()))
    # room for two calls and one tool result: the second result does not fit, so the episode ends there
    traj, _ = run_script(tok, [CALL] * 10, task, max_tokens=prompt + 2 * call + 2 * result - 1)
    assert (traj.turns, len(traj.ids), traj.answered) == (2, prompt + 2 * call + result, False)
    # a turn is cut at the cap
    traj, _ = run_script(tok, [CALL] * 10, task, max_tokens=prompt + call + result + 5)
    assert (traj.turns, len(traj.ids), sum(traj.model_mask)) == (2, prompt + call + result + 5, call + 5)


def test_every_turn_samples_with_its_own_seed(tok):
    task = generate_tasks(1, seed=0)[0]
    _, engine = run_script(tok, [CALL] * 10, task, seed=9, max_turns=4)
    assert engine.seeds == [derive_seed(9, turn) for turn in range(4)] and len(set(engine.seeds)) == 4
    _, engine = run_script(tok, [CALL] * 10, task, max_turns=2)
    assert engine.seeds == [None, None]  # unseeded stays unseeded


@pytest.mark.parametrize("selector", ["all", "soft_or"])
def test_tool_tokens_are_never_selected_nor_in_the_loss(tok, micro_agent, selector):
    cfg = compose_config(["task=toy_agent", f"pair.teacher={micro_agent['teacher']}",
                          f"pair.student={micro_agent['student']}", f"selector={selector}", "budget=0.5"])
    pair = load_pair(cfg.pair, torch.device("cpu"))
    tasks = generate_tasks(3, seed=0)
    trajs = []
    for task in tasks:
        (item, _), *rest = task.meta["bought"]
        call = f'<tool_call>\n{{"name": "lookup", "arguments": {{"item": "{item}"}}}}\n</tool_call>'
        traj, _ = run_script(pair.tokenizer, [call, "She pays \\boxed{1}."], task)
        trajs.append(traj)
    batch = agent.pack(trajs, pair.tokenizer.pad_token_id)
    pair.student.zero_grad(set_to_none=True)
    metrics, stats, kept = train_step.distill_step(pair, batch, recipe.specs(cfg, pair.device).step, torch.Generator().manual_seed(0), {})
    model_tokens = sum(sum(t.model_mask) for t in trajs)
    assert metrics["tokens/total"] == model_tokens == batch.target_mask.sum()
    positions = batch.target_mask.nonzero()  # [N, 2]: the flat order of the stats
    for b, t in positions[kept].tolist():
        assert trajs[b].model_mask[t + 1]  # every kept position predicts a model token
    if selector == "all":  # the loss is the float64 reverse KL averaged over exactly the model tokens
        t = recipe.specs(cfg, pair.device).step.temperature  # the rollouts' temperature, 0.6 in task=toy_agent
        with torch.no_grad():
            ls = (pair.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double() / t).log_softmax(-1)
            lt = (pair.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double() / t).log_softmax(-1)
        kl = (ls.exp() * (ls - lt)).sum(-1)  # [B, T]
        model_next = torch.zeros_like(batch.target_mask)
        for b, t in enumerate(trajs):
            model_next[b, : len(t.ids) - 1] = torch.tensor(t.model_mask[1:])
        assert metrics["loss"] == pytest.approx(kl[model_next].mean().item(), rel=1e-4)


def test_agentic_opd_trains_on_the_toy_agent_env(tmp_path, micro_agent):
    cfg = compose_config(["task=toy_agent", f"pair.teacher={micro_agent['teacher']}",
                          f"pair.student={micro_agent['student']}", "train.steps=2", "train.prompts_per_step=3",
                          "rollout.max_new_tokens=24", "agent.max_turns=3", "eval.limit=3", "logger=none",
                          "train.device=cpu"])
    final = recipe.train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["tokens/total"] > 0 and 0.4 <= r["tokens/kept_frac"] <= 0.6
        assert 1 <= r["rollout/turns"] <= 3 and "rollout/tool_calls" in r and 0 <= r["rollout/accuracy"] <= 1
    assert "accuracy" in final and "turns" in final
    assert any("eval/toy_agent/accuracy" in r for r in rows if r["step"] == 0)
    assert json.loads(json.dumps(final))  # plain floats


def test_a_template_without_an_end_of_turn_token_is_a_config_error(tok):
    broken = make_tokenizer(generate_tasks(20, seed=0))
    broken.chat_template = tok.chat_template.replace("<|im_end|>", "")  # turns end with a newline only
    assert agent.tool_turn_ids(tok, ["4"], PairConfig())  # the real template works
    with pytest.raises(ConfigError, match="EOS"):
        agent.tool_turn_ids(broken, ["4"], PairConfig())


class AnswersEvenTasks:
    """Answers every task in one turn: right for the even-numbered tasks, off by one for the others."""

    def __init__(self, tok, tasks):
        self.tok, self.tasks, self.eos_ids, self.prompts = tok, tasks, {tok.eos_token_id}, 0

    def generate(self, prompts, sampling):
        self.prompts += len(prompts)
        out = []
        for p in prompts:
            i = next(i for i, t in enumerate(self.tasks) if t.prompt in self.tok.decode(p))
            text = f"\\boxed{{{self.tasks[i].meta['answer'] + i % 2}}}" + self.tok.eos_token
            out.append(self.tok(text, add_special_tokens=False)["input_ids"])
        return Generation(out)


def test_env_benchmark_split_over_two_ranks_gives_the_single_process_result(tok):
    """Each rank runs the episodes of its share of the tasks (the collective injected); the gathered episodes give
    rank 0 the metrics and records of one process running them all."""
    cfg = compose_config(["task=toy_agent", "eval.n=2", "eval.temperature=0.6", "eval.limit=5"])
    tasks = generate_tasks(5, seed=0)
    bench = EnvBenchmark(ToyAgentEnv(cfg.benchmark), tasks)
    evals = eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout)
    want = evaluate_benchmark(None, tok, evals, bench, engine=AnswersEvenTasks(tok, tasks))
    assert want[0]["accuracy"] == pytest.approx(0.6)  # tasks 0, 2, 4 of 5

    outs, got, prompts = {}, {}, {}

    def all_gather_object(parts, out):  # the ranks' outputs so far: rank 1 runs first, so rank 0 gets both
        outs[parallel.rank()] = out
        parts[:] = [outs.get(r, out) for r in range(2)]

    for r in (1, 0):
        engine = AnswersEvenTasks(tok, tasks)
        with patch.object(parallel, "rank", lambda r=r: r), patch.object(parallel, "world_size", lambda: 2), \
                patch.object(parallel.dist, "all_gather_object", all_gather_object):
            got[r] = evaluate_benchmark(None, tok, evals, bench, engine=engine, shard=parallel.RankShard())
        prompts[r] = engine.prompts
    assert prompts == {0: 6, 1: 6}  # 3 tasks each (the last padded), 2 episodes per task
    assert got[0][0] == want[0] and got[0][1] == want[1]
