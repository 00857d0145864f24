"""DeepPlanning travel: plan a multi-day trip with 9 query tools, answer with a Markdown plan, scored by rules.

Database (`database_{en,zh}/id_<task id>/`, one sandbox per task): `trains/trains.csv`, `flights/flights.csv`
(origin_city, destination_city, dep_date, seat_class, ...), `hotels/hotels.csv` (name, hotel_star, brand, price,
score, decoration_time, services, ...), `attractions/attractions.csv` (attraction_name, attraction_type, ...),
`restaurants/restaurants.csv` (restaurant_name, nearby_attraction_name, latitude, longitude, opening_time,
closing_time, price_per_person, rating, cuisine, tags), `locations/locations_coords.csv`,
`transportation/distance_matrix.csv`. The tools filter those tables by their arguments (tip's own implementation of
the upstream tool schemas in ../shared/data/deepplanning/travel_tool_schema_{en,zh}.json).

Scoring follows upstream's structure on the plan converted to JSON (the schema of upstream's conversion prompt:
`budget_summary` and `daily_plans[].{day_number, current_city, accommodation, activities[].{time_slot, type,
details}}`):
- commonsense: 8 dimensions of equal weight (route, sandbox, structure, time, business hours, duration, cost,
  diversity); a dimension scores 1 only when all its checks pass; `commonsense_score` = their weighted sum;
- personalized: 1 when every hard constraint's gold entity (hotel, restaurant, attractions, outbound/inbound train or
  flight number in the task's `hard_constraints`) is in the plan, else 0;
- `composite_score` = their mean; `case_acc` (this env's `accuracy`) = 1 when both are 1.
The checks are tip's reading of upstream's rule names and the plan format, not a port: thresholds marked [choice].

Deviation from upstream: upstream converts the Markdown plan to JSON with a hosted LLM (an API model). Here the
conversion model is `env_options.converter`: an HF model id or path, default the pair's teacher; a final answer that
already holds a JSON plan is used as is (tip_cli.envs.deepplanning.convert).
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tip_cli.config.schema import ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Environment, Episode, Resolve, Task, dumps
from tip_cli.envs.deepplanning.common import find_database, load_json, missing, split
from tip_cli.envs.deepplanning.convert import HFConverter, extract_json

TABLES = {"trains": "trains/trains.csv", "flights": "flights/flights.csv", "hotels": "hotels/hotels.csv",
          "attractions": "attractions/attractions.csv", "restaurants": "restaurants/restaurants.csv",
          "locations": "locations/locations_coords.csv", "routes": "transportation/distance_matrix.csv"}
DIMENSIONS = ("route", "sandbox", "structure", "time", "business_hours", "duration", "cost", "diversity")
MEAL_MINUTES = (20, 180)  # [choice] a meal takes between 20 minutes and 3 hours
ATTRACTION_MIN_MINUTES = 30  # [choice] a visit of under half an hour is not a visit
COST_TOLERANCE = 0.01  # [choice] relative error allowed between the budget summary and the itemised costs


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _norm(s: Any) -> str:
    return re.sub(r"\s+", " ", str(s or "")).strip().lower()


def _rows(table: list[dict], **where: Any) -> list[dict]:
    """Rows whose columns equal the given values (case-insensitive); unset values and absent columns match all."""
    return [r for r in table if all(v in (None, "") or k not in r or _norm(r[k]) == _norm(v) for k, v in where.items())]


def _minutes(hhmm: str) -> int | None:
    found = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(hhmm))
    return int(found.group(1)) * 60 + int(found.group(2)) if found else None


def _slot(activity: dict) -> tuple[int, int] | None:
    parts = str(activity.get("time_slot", "")).split("-")
    if len(parts) != 2:
        return None
    start, end = _minutes(parts[0]), _minutes(parts[1])
    return None if start is None or end is None else (start, end)


def _num(x: Any) -> float:
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def _acts(plan: dict, kind: str) -> list[dict]:
    return [a for d in plan.get("daily_plans", []) for a in d.get("activities", []) if a.get("type") == kind]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= COST_TOLERANCE * max(1.0, abs(b))


def commonsense_checks(plan: dict, meta: dict, db: dict[str, list[dict]]) -> dict[str, dict[str, bool]]:
    """{dimension: {check: passed}} of a JSON plan; a check on a database table absent from `db` is skipped."""
    days = plan.get("daily_plans") or []
    intercity = [[a for a in d.get("activities", []) if a.get("type") == "travel_intercity_public"] for d in days]
    people, rooms = int(meta.get("people_number", 1)), int(meta.get("room_number", 1))
    out: dict[str, dict[str, bool]] = {}
    out["route"] = {
        "valid_days": len(days) == int(meta.get("days", len(days))),
        "closed_loop": bool(days) and bool(intercity[0]) and bool(intercity[-1]),
    }
    names = {"hotels": {_norm(d["accommodation"]["name"]) for d in days if d.get("accommodation")} | {
        _norm(a["details"].get("name")) for a in _acts(plan, "hotel")},
        "attractions": {_norm(a["details"].get("name")) for a in _acts(plan, "attraction")},
        "restaurants": {_norm(a["details"].get("name")) for a in _acts(plan, "meal")}}
    columns = {"hotels": "name", "attractions": "attraction_name", "restaurants": "restaurant_name"}
    sandbox = {f"{t}_from_search": names[t] <= {_norm(r.get(c)) for r in db[t]} for t, c in columns.items() if t in db}
    numbers = {_norm(a["details"].get("number")): _norm(a["details"].get("mode")) for a in _acts(plan, "travel_intercity_public")}
    known = {_norm(r.get(k)) for t in ("trains", "flights") if t in db for r in db[t] for k in ("train_no", "flight_no", "number") if k in r}
    if "trains" in db or "flights" in db:
        sandbox["intercity_from_search"] = set(numbers) <= known
    out["sandbox"] = sandbox
    out["structure"] = {
        "accommodation_every_night": all(d.get("accommodation") for d in days[:-1]),
        "last_activity_is_hotel": all(d.get("activities") and d["activities"][-1].get("type") == "hotel" for d in days[:-1]),
        "meal_every_day": all(any(a.get("type") == "meal" for a in d.get("activities", [])) for d in days),
    }
    slots_ok, ordered = True, True
    for d in days:
        slots = [_slot(a) for a in d.get("activities", [])]
        slots_ok &= all(s is not None and s[0] < s[1] for s in slots)
        ordered &= all(a is not None and b is not None and a[1] <= b[0] for a, b in itertools.pairwise(slots))
    out["time"] = {"valid_time_slots": slots_ok, "no_overlap": ordered}
    hours = {}
    if "restaurants" in db:
        table = {_norm(r.get("restaurant_name")): r for r in db["restaurants"]}
        ok = True
        for a in _acts(plan, "meal"):
            row, slot = table.get(_norm(a["details"].get("name"))), _slot(a)
            open_, close = (_minutes(row.get("opening_time", "")), _minutes(row.get("closing_time", ""))) if row else (None, None)
            if slot and open_ is not None and close is not None and close > open_:
                ok &= open_ <= slot[0] and slot[1] <= close
        hours["meals_in_business_hours"] = ok
    out["business_hours"] = hours
    meal_minutes = [s[1] - s[0] for a in _acts(plan, "meal") if (s := _slot(a))]
    visit_minutes = [s[1] - s[0] for a in _acts(plan, "attraction") if (s := _slot(a))]
    out["duration"] = {
        "meal_duration": all(MEAL_MINUTES[0] <= m <= MEAL_MINUTES[1] for m in meal_minutes),
        "attraction_duration": all(m >= ATTRACTION_MIN_MINUTES for m in visit_minutes),
    }
    budget = plan.get("budget_summary") or {}
    parts = ("transportation", "accommodation", "meals", "attractions_and_tickets", "other")
    nights = [d["accommodation"] for d in days if d.get("accommodation")]
    out["cost"] = {
        "total_is_sum": _close(_num(budget.get("total_estimated_budget")), sum(_num(budget.get(p)) for p in parts)),
        "meals": _close(_num(budget.get("meals")), people * sum(_num(a["details"].get("cost")) for a in _acts(plan, "meal"))),
        "attractions": _close(_num(budget.get("attractions_and_tickets")),
                              people * sum(_num(a["details"].get("cost")) for a in _acts(plan, "attraction"))),
        "accommodation": _close(_num(budget.get("accommodation")), rooms * sum(_num(n.get("price_per_night")) for n in nights)),
        "transportation": _close(_num(budget.get("transportation")),
                                 people * sum(_num(a["details"].get("cost")) for a in _acts(plan, "travel_intercity_public"))
                                 + sum(_num(a["details"].get("cost")) for a in _acts(plan, "travel_city"))),
    }
    restaurants = [_norm(a["details"].get("name")) for a in _acts(plan, "meal")]
    attractions = [_norm(a["details"].get("name")) for a in _acts(plan, "attraction")]
    out["diversity"] = {"diverse_restaurants": len(set(restaurants)) == len(restaurants),
                        "diverse_attractions": len(set(attractions)) == len(attractions)}
    return out


def hard_checks(plan: dict, meta: dict) -> dict[str, bool]:
    """{constraint: its gold entity is in the plan} for the task's hard constraints."""
    days = plan.get("daily_plans") or []
    hotels = {_norm(d["accommodation"].get("name")) for d in days if d.get("accommodation")}
    restaurants = {_norm(a["details"].get("name")) for a in _acts(plan, "meal")}
    attractions = {_norm(a["details"].get("name")) for a in _acts(plan, "attraction")}
    legs = [_norm(a["details"].get("number")) for a in _acts(plan, "travel_intercity_public")]
    out = {}
    for name, c in (meta.get("hard_constraints") or {}).items():
        checks = []
        if c.get("hotel_name"):
            checks.append(_norm(c["hotel_name"]) in hotels)
        if c.get("restaurant_name"):
            checks.append(_norm(c["restaurant_name"]) in restaurants)
        if c.get("attraction_names"):
            checks.append({_norm(a) for a in c["attraction_names"]} <= attractions)
        for key, leg in (("outbound", 0), ("inbound", -1)):
            gold = c.get(f"{key}_train_no") or c.get(f"{key}_flight_no")
            if gold:
                checks.append(bool(legs) and legs[leg] == _norm(gold))
        out[name] = bool(checks) and all(checks)
    return out


def score_plan(plan: dict | None, meta: dict, db: dict[str, list[dict]]) -> dict[str, float]:
    """Upstream's aggregation: dimensions all-or-nothing, equal weights; personalized 0/1; composite; case_acc."""
    if plan is None:  # no plan, or the conversion failed: nothing is satisfied
        dims = dict.fromkeys(DIMENSIONS, 0.0)
        personalized = 0.0
    else:
        checks = commonsense_checks(plan, meta, db)
        dims = {d: float(all(checks[d].values())) for d in DIMENSIONS}
        hard = hard_checks(plan, meta)
        personalized = float(bool(hard) and all(hard.values()))
    commonsense = sum(dims.values()) / len(DIMENSIONS)
    case_acc = float(commonsense == 1.0 and personalized == 1.0)
    return {"accuracy": case_acc, "case_acc": case_acc, "commonsense_score": commonsense,
            "personalized_score": personalized, "composite_score": (commonsense + personalized) / 2,
            "plan_parsed": float(plan is not None), **{f"commonsense/{d}": v for d, v in dims.items()}}


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 12742 * math.asin(math.sqrt(a))


class TravelEpisode(Episode):
    def __init__(self, task: Task, db: dict[str, list[dict]], tools: list[dict], convert: Callable[[str], dict | None]):
        self.task, self.db, self.tools, self.convert = task, db, tools, convert
        self.messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.prompt}]

    def _table(self, name: str) -> list[dict]:
        if name not in self.db:
            raise KeyError(f"this task's sandbox has no {TABLES[name]}")
        return self.db[name]

    def call(self, name: str, a: dict[str, Any]) -> str:
        if name in ("query_train_info", "query_flight_info"):
            rows = _rows(self._table("trains" if "train" in name else "flights"), origin_city=a["origin"],
                         destination_city=a["destination"], dep_date=a["depDate"], seat_class=a.get("seatClassName"))
        elif name == "query_hotel_info":
            rows = _rows(self._table("hotels"), hotel_star=a.get("hotelStar"), brand=a.get("hotelBrands"))
        elif name == "query_attraction_details":
            rows = _rows(self._table("attractions"), attraction_name=a["attraction_name"])
        elif name == "recommend_attractions":
            rows = _rows(self._table("attractions"), city=a["city"], attraction_type=a.get("attraction_type"))
        elif name in ("query_restaurant_details",):
            rows = _rows(self._table("restaurants"), restaurant_name=a["restaurant_name"])
        elif name == "recommend_restaurants":
            lat, lon = float(a["latitude"]), float(a["longitude"])
            located = [r for r in self._table("restaurants") if r.get("latitude") and r.get("longitude")]
            rows = sorted(located, key=lambda r: _haversine_km(lat, lon, float(r["latitude"]), float(r["longitude"])))[:10]
        elif name == "search_location":
            rows = [r for r in self._table("locations") if _norm(a["place_name"]) in map(_norm, r.values())]
        else:  # query_road_route_info
            o, d = _norm(a["origin"]), _norm(a["destination"])
            rows = [r for r in self._table("routes") if o in map(_norm, r.values()) and d in map(_norm, r.values())]
        return dumps(rows) if rows else dumps({"error": f"no results for {name} with {dumps(a)}"})

    def score(self, final: str) -> dict[str, float]:
        plan = extract_json(final) if final else None
        if plan is None and final.strip():
            plan = self.convert(final)
        return score_plan(plan, self.task.meta, self.db)


SYSTEM = ("You are a travel planning assistant. Use the tools to look up transport, hotels, attractions and "
          "restaurants, then answer, without a tool call, with the complete plan: a **Budget Summary** (Transportation, "
          "Accommodation, Meals, Attractions & Tickets, Other, Total Estimated Budget) and, for each day, **Day N:**, "
          "Current City, Accommodation and lines 'HH:MM-HH:MM | activity_type | details, price'.")


def load_sandbox(folder: Path) -> dict[str, list[dict]]:
    return {name: read_table(folder / rel) for name, rel in TABLES.items() if (folder / rel).is_file()}


class TravelEnv(Environment):
    """`path`: the task file (travel_query_{en,zh}.json); `env_options`: language (default from the file name),
    split_seed (default 0), converter (HF model id or path; default the pair's teacher); `split`: train | test | all
    (80/20 by split_seed); `db_path`: the database."""

    def __init__(self, cfg: DatasetConfig, pair: PairConfig | None = None, resolve: Resolve | None = None):
        path = Path(cfg.path or "").expanduser()
        if not path.is_file():
            raise ConfigError(f"{cfg.name}.path={cfg.path!r} is not a file; expected a travel task file, e.g. "
                              "../shared/data/deepplanning/travel_query_en.json")
        if cfg.split not in ("train", "test", "all"):
            raise ConfigError(f"{cfg.name}.split={cfg.split!r} is not valid; expected one of: train, test, all")
        opts = cfg.env_options
        lang = opts.get("language") or ("zh" if "zh" in path.stem else "en")
        rows = split(load_json(path), cfg.split, int(opts.get("split_seed", 0)))
        self._tasks = [Task(f"travel-{lang}-{r['id']}", r["query"], {**r["meta_info"], "id": r["id"]}) for r in rows]
        schema = path.parent / f"travel_tool_schema_{lang}.json"
        self.tools = load_json(schema)
        self.root = find_database(cfg, f"travel database_{lang}", lambda d: any(d.glob("id_*")), [f"database_{lang}"],
                                  [f"travelplanning/database/database_{lang}.zip"])
        for t in self._tasks:
            if not (self.root / f"id_{t.meta['id']}").is_dir():
                raise missing(cfg, f"id_{t.meta['id']}", [self.root], "that database has no sandbox for this task")
        converter = opts.get("converter") or (pair.teacher if pair else None)
        if converter is None:
            raise ConfigError(f"{cfg.name}.env_options.converter is not set and there is no pair teacher to default to")
        self.convert: Callable[[str], dict | None] = HFConverter(converter, pair or PairConfig(), resolve)

    def tasks(self) -> list[Task]:
        return self._tasks

    def reset(self, task: Task) -> TravelEpisode:
        return TravelEpisode(task, load_sandbox(self.root / f"id_{task.meta['id']}"), self.tools, self.convert)
