"""DeepPlanning travel's plan conversion: the Markdown plan a model answers with -> the JSON plan the rule checks
score (tip_cli.envs.deepplanning.travel).

Upstream converts with a hosted LLM (an API model); here `HFConverter` runs a local causal LM (the
`env_options.converter` model, default the pair's teacher) on CONVERT_PROMPT, the schema of upstream's conversion
prompt, and `extract_json` takes the JSON object out of its answer (or out of a final answer that already holds one).
"""

from __future__ import annotations

import json
import re

from tip_cli.config.schema import PairConfig
from tip_cli.envs.base import Resolve


def extract_json(text: str) -> dict | None:
    """The JSON object in `<JSON>...</JSON>` tags, a ```json fence, or the outermost braces; None if none parses."""
    for pattern in (r"<JSON>([\s\S]*?)</JSON>", r"```(?:json)?\s*([\s\S]*?)```", r"(\{[\s\S]*\})"):
        found = re.search(pattern, text)
        if found:
            try:
                obj = json.loads(found.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


CONVERT_PROMPT = (
    "Convert the travel plan below into one JSON object, wrapped in <JSON></JSON>, without adding or dropping "
    "anything. Schema: {\"budget_summary\": {\"transportation\": number, \"accommodation\": number, \"meals\": number, "
    "\"attractions_and_tickets\": number, \"other\": number, \"total_estimated_budget\": number, \"currency\": string}, "
    "\"daily_plans\": [{\"day_number\": number, \"current_city\": string, \"accommodation\": {\"name\": string, "
    "\"price_per_night\": number}, \"activities\": [{\"time_slot\": \"HH:MM-HH:MM\", \"type\": "
    "\"travel_intercity_public|travel_city|attraction|meal|hotel|buffer\", \"details\": {...}}]}]}. details: "
    "travel_intercity_public {mode, number, from, to, cost}; travel_city {from, to, distance, duration, cost}; "
    "attraction {name, city, cost}; meal {meal_type, name, cost}; hotel {activity, name}; buffer {description}. "
    "Prices are plain numbers; omit accommodation on a day whose accommodation is '-'."
)


class HFConverter:
    """Markdown plan -> JSON with a local causal LM (greedy), loaded on first use. `resolve` turns the model
    reference into a path (tip_cli.pairs.resolve_model: toy:// pairs); without it the reference is a HF id or path."""

    def __init__(self, model: str, pair: PairConfig, resolve: Resolve | None = None, max_new_tokens: int = 4096):
        self.ref, self.pair, self.max_new_tokens, self.model = model, pair, max_new_tokens, None
        self.resolve = resolve or str

    def __call__(self, text: str) -> dict | None:
        import torch

        from tip_cli.models import load_model, load_tokenizer, pick_device, render_prompt

        if self.model is None:
            path = self.resolve(self.ref)
            self.model = load_model(path, self.pair, pick_device("auto"), trainable=False)
            self.tok = load_tokenizer(path, self.pair)
        ids = torch.tensor([render_prompt(self.tok, f"{CONVERT_PROMPT}\n\n{text}", self.pair)], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return extract_json(self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
