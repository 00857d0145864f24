"""The embedded tool-use pair: tiny Qwen3 models that call tools in the Hermes format, for agentic OPD on CPU.

The task is tip_cli.envs.toy_agent (price lookups + a calculator). The tokenizer is a BPE trained on the task's
transcripts, with `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>` as whole tokens and a ChatML
chat template that renders tool results Qwen-style (consecutive tool messages in one user turn, each inside
`<tool_response>` tags). The teacher is SFT-trained on correct transcripts; the student, smaller, on transcripts
with a systematic error: for two-item purchases it adds quantities and prices ("3 + 4 + 2 + 7") where the teacher
multiplies ("3 * 4 + 2 * 7"), so it is confidently wrong at the operator tokens the teacher contradicts. Transcripts
are built by the same code the rollouts use (tip_cli.rollout.agent), and SFT trains only on the model-turn tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from tip_cli.config.schema import AgentConfig, ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Task
from tip_cli.envs.toy_agent import SPLITS, ToyAgentEnv, ToyAgentEpisode, calculate, generate_tasks
from tip_cli.rollout import agent
from tip_cli.rollout.batch import Sampling, eos_ids
from tip_cli.rollout.hf import HFEngine
from tip_cli.toy.build import cached_build
from tip_cli.toy.sft import ModelSpec, new_model, save_model, sft
from tip_cli.toy.tokenizer import train_tokenizer

TOY_AGENT_VERSION = "toy-agent-v1"
TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools: ' + (tools | map(attribute='function') | map(attribute='name')"
    " | join(', ')) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEACHER = ModelSpec(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)
STUDENT = ModelSpec(hidden=64, layers=2, heads=1, kv_heads=1, intermediate=192)
TEACHER_SFT = dict(steps=400, batch_size=16, lr=3e-3)
STUDENT_SFT = dict(steps=200, batch_size=16, lr=3e-3)
N_EVAL = 100  # test tasks the build reports accuracy on


def call_text(name: str, **arguments) -> str:
    return f"{TAGS[0]}\n{json.dumps({'name': name, 'arguments': arguments})}\n{TAGS[1]}"


def turns(task: Task, misread: bool = False) -> list[str]:
    """The model turns of a solution: one lookup per item, the calculator for the total, the boxed answer.

    With `misread`, a two-item total is written as the sum of every quantity and price (the student's error).
    """
    bought = task.meta["bought"]
    out = [call_text("lookup", item=item) for item, _ in bought]
    prices = task.meta["prices"]
    if misread and len(bought) > 1:
        expression = " + ".join(f"{q} + {prices[item]}" for item, q in bought)
    else:
        expression = " + ".join(f"{q} * {prices[item]}" for item, q in bought)
    out.append(call_text("calculator", expression=expression))
    pron = task.prompt.split(" does ")[1].split()[0]
    out.append(f"{pron.capitalize()} pays \\boxed{{{calculate(expression)}}}.")
    return out


def transcript(tok: PreTrainedTokenizerFast, task: Task, misread: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a whole solved episode and its model-token mask, assembled as tip_cli.rollout.agent's rollout does."""
    pair = PairConfig()
    ep = ToyAgentEpisode(task)
    ids = agent.render_chat(tok, ep.messages, ep.tools, pair)
    mask = [False] * len(ids)
    for text in turns(task, misread):
        model = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids, mask = ids + model, mask + [True] * len(model)
        calls = agent.parse_tool_calls(text)
        if calls:
            delta = agent.tool_turn_ids(tok, [ep.step(c) for c in calls], pair)
            ids, mask = ids + delta, mask + [False] * len(delta)
    return ids, mask


def make_tokenizer(tasks: list[Task]) -> PreTrainedTokenizerFast:
    """toy.train_tokenizer's BPE on the task's texts, with the tool tags as whole tokens and the tool template."""
    texts = [{"problem": "system\nTools: lookup, calculator " + t.prompt, "solution": " ".join(turns(t)) + " " + " ".join(turns(t, True))} for t in tasks]
    for row in texts:
        for tag in TAGS:
            row["solution"] = row["solution"].replace(tag, " ")
    tok = train_tokenizer(texts)
    tok.add_tokens(TAGS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@torch.no_grad()
def agent_accuracy(model, tok, tasks: list[Task]) -> float:
    """Greedy episodes on `tasks` with the toy_agent env: the fraction answered right."""
    env = ToyAgentEnv(DatasetConfig(name="toy_agent", env="toy_agent", path="toy_agent://test"))  # resets any task
    trajs = agent.rollout(HFEngine(model, tok, 100), tok, env, tasks, Sampling(temperature=0.0, max_new_tokens=48),
                          AgentConfig(max_turns=6, max_tokens=512), PairConfig(),
                          eos_ids(model.generation_config.eos_token_id, tok))
    return agent.summarize(trajs, env)["accuracy"]


@dataclass(frozen=True)
class Recipe:
    teacher: ModelSpec
    student: ModelSpec
    teacher_sft: dict
    student_sft: dict
    n_train: int = 1000
    n_eval: int = N_EVAL  # test tasks whose greedy accuracy the build reports (0: none)


FULL = Recipe(TEACHER, STUDENT, TEACHER_SFT, STUDENT_SFT)
# for tests: built in seconds; the teacher gets a few SFT steps and the student none, so they differ
MICRO = Recipe(ModelSpec(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128),
               ModelSpec(hidden=64, layers=1, heads=1, kv_heads=1, intermediate=128),
               dict(steps=20, batch_size=16, lr=3e-3), dict(steps=0, batch_size=16, lr=3e-3), n_train=200, n_eval=0)


def _build_into(out: Path, seed: int, log: Callable[[str], None], recipe: Recipe = FULL) -> dict:
    train = generate_tasks(recipe.n_train, seed, start=SPLITS["train"][0])
    test = generate_tasks(recipe.n_eval, seed, start=SPLITS["test"][0])
    tok = make_tokenizer(train)
    info: dict = {"version": TOY_AGENT_VERSION, "seed": seed, "vocab_size": len(tok), "n_train": len(train)}
    for kind, spec, hp, misread, model_seed in (("teacher", recipe.teacher, recipe.teacher_sft, False, seed),
                                                ("student", recipe.student, recipe.student_sft, True, seed + 1)):
        model = new_model(spec, tok, model_seed)
        log(f"[toy-agent] {kind}: {sum(p.numel() for p in model.parameters()):,} params, SFT {hp['steps']} steps")
        if hp["steps"]:
            data = [transcript(tok, t, misread) for t in train]
            sft(model, data, tok.pad_token_id, seed=model_seed, log=log, name=kind, **hp)
        save_model(model, tok, out / kind)
        info[kind] = {**asdict(spec), **hp, "misread": misread}
        if test:
            info[kind]["test_accuracy"] = agent_accuracy(model, tok, test)
            log(f"[toy-agent] {kind} accuracy on {len(test)} test tasks: {info[kind]['test_accuracy']:.3f}")
    return info


def build_micro_agent_pair(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny tool-use pair for fast tests: `(out_dir/teacher, out_dir/student)`."""
    _build_into(Path(out_dir), seed, lambda _: None, MICRO)
    return Path(out_dir) / "teacher", Path(out_dir) / "student"


def build_toy_agent(seed: int = 0, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build (or find) the pair in `cache_root()/toy-agent-v1-seed{seed}`: teacher/, student/, build.json."""
    final, info = cached_build(f"{TOY_AGENT_VERSION}-seed{seed}", lambda out: _build_into(out, seed, log), force)
    if info is not None:
        log(f"[toy-agent] built {final} in {info['seconds']:.0f}s")
    return final


def toy_agent_path(kind: str, seed: int = 0) -> Path:
    """The teacher/ or student/ model dir, building the pair first if needed."""
    if kind not in ("teacher", "student"):
        raise ConfigError(f"unknown toy_agent model {kind!r}; expected teacher or student")
    return build_toy_agent(seed) / kind

