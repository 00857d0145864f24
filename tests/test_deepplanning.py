"""DeepPlanning environments on small synthetic databases laid out as upstream's: tools, scorers, missing database."""

import json
import shutil
from pathlib import Path

import pytest

from tip_cli.cli import compose_config
from tip_cli.config.schema import DatasetConfig
from tip_cli.envs.base import ToolCall
from tip_cli.envs.deepplanning.common import DatabaseMissing
from tip_cli.envs.deepplanning.shopping import ShoppingEnv, score_cart
from tip_cli.envs.deepplanning.travel import TravelEnv, commonsense_checks, hard_checks, score_plan
from tip_cli.eval.benchmark import eval_spec, load_benchmark


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------ shopping

def test_shopping_score_matches_upstream_definition():
    key = {"ground_truth_products": [{"product_id": "p1"}, {"product_id": "p2"}, {"product_id": "p3"}],
           "ground_truth_coupons": {"Same-brand: ¥25 off every ¥200": 1, "VIP: ¥200 off every ¥1,000": 2}}
    cart = {"items": [{"product_id": "p1", "quantity": 1}, {"product_id": "p2", "quantity": 3},
                      {"product_id": "p9", "quantity": 1}],
            "used_coupons": [{"coupon_name": "Same-brand: ¥25 off every ¥200", "quantity": 1},
                             {"coupon_name": "VIP: ¥200 off every ¥1,000", "quantity": 1}]}
    # matched: p1, p2 and the same-brand coupon (the VIP one has the wrong count) = 3 of 3 + 2
    assert score_cart(cart, key) == {"accuracy": 0.0, "case_score": 0.0, "score": 0.6, "coupon_score": 0.5,
                                     "matched_count": 3.0, "expected_count": 5.0, "extra_products_count": 1.0}
    cart["items"].append({"product_id": "p3", "quantity": 1})
    cart["used_coupons"][1]["quantity"] = 2
    assert score_cart(cart, key)["case_score"] == 1.0  # the extra p9 is not penalised


@pytest.fixture
def shopping_db(tmp_path, shared_data) -> Path:
    """Task folder (queries + the real tool schema) and a level-1 database with one case."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(shared_data / "deepplanning" / "shopping_tool_schema.json", tasks)
    (tasks / "shopping_level1_query.json").write_text(json.dumps([{"id": "1", "query": "Buy Nike orange shoes."}]))
    case = tmp_path / "db" / "database_level1" / "case_1"
    case.mkdir(parents=True)
    write_jsonl(case / "products.jsonl", [
        {"product_id": "n1", "name": "Nike Air Zoom running shoes", "brand": "Nike", "color": "Orange", "size": "42",
         "price": 450.0, "stock_quantity": 3, "sales_volume": {"monthly": 10, "total": 300},
         "rating": {"average_score": 4.5, "total_reviews": 900}, "applicable_coupons": ["Same-brand: ¥25 off every ¥200"],
         "shipping_info": {"origin": "Zhejiang Province", "provider": "sf_express"}},
        {"product_id": "n2", "name": "Nike Court sneakers", "brand": "Nike", "color": "White", "size": "42",
         "price": 300.0, "stock_quantity": 1, "sales_volume": {"monthly": 50, "total": 800},
         "rating": {"average_score": 4.8, "total_reviews": 2000}, "applicable_coupons": [],
         "shipping_info": {"origin": "Guangdong", "provider": "china_post"}},
        {"product_id": "a1", "name": "Adidas Ultraboost", "brand": "Adidas", "color": "Orange", "size": "43",
         "price": 700.0, "stock_quantity": 5, "sales_volume": {"monthly": 5, "total": 100},
         "rating": {"average_score": 4.1, "total_reviews": 300}, "applicable_coupons": [],
         "shipping_info": {"origin": "Beijing", "provider": "default"}},
        *({"product_id": f"u{i}", "name": f"Basic cotton T-shirt {i}", "brand": "Uniqlo", "color": "Grey", "size": "M",
           "price": 99.0, "stock_quantity": 9, "sales_volume": {"monthly": 1, "total": 1},
           "rating": {"average_score": 4.0, "total_reviews": 10}, "applicable_coupons": [],
           "shipping_info": {"origin": "Shanghai", "provider": "default"}} for i in range(20)),  # BM25 needs a catalogue
    ])
    (case / "user_info.json").write_text(json.dumps({"address": "beijing", "is_vip": False,
                                                     "coupons": {"Same-brand: ¥25 off every ¥200": 2,
                                                                 "VIP: ¥200 off every ¥1,000": 1}}))
    (case / "cart.json").write_text(json.dumps({"items": [], "used_coupons": []}))
    (case / "validation_cases.json").write_text(json.dumps({
        "ground_truth_products": [{"product_id": "n1"}], "ground_truth_coupons": {"Same-brand: ¥25 off every ¥200": 2}}))
    return tmp_path


def shopping_cfg(root: Path, db: Path | None = None) -> DatasetConfig:
    return DatasetConfig(name="benchmark", env="deepplanning_shopping", path=str(root / "tasks"),
                         db_path=str(db or root / "db"), env_options={"levels": [1]})


def call(ep, name, **args):
    return json.loads(ep.step(ToolCall(name, args)))


def test_shopping_tools_and_cart_on_a_synthetic_case(shopping_db):
    env = ShoppingEnv(shopping_cfg(shopping_db))
    (task,) = env.tasks()
    ep = env.reset(task)
    assert len(ep.tools) == 15 and ep.messages[-1]["content"] == "Buy Nike orange shoes."
    assert call(ep, "search_products", query="adidas ultraboost")["product_ids"] == ["a1"]
    assert call(ep, "filter_by_brand", brand_names=["nike"])["product_ids"] == ["n1", "n2"]
    assert call(ep, "filter_by_color", product_ids=["n1", "n2", "a1"], colors=["Orange"])["product_ids"] == ["n1", "a1"]
    assert call(ep, "filter_by_range", condition_key="rating.total_reviews", operator=">", value=800)["product_ids"] == ["n1", "n2"]
    assert call(ep, "sort_products", product_ids=["n1", "a1", "n2"], sort_by="price", order="asc")["product_ids"] == ["n2", "n1", "a1"]
    assert call(ep, "sort_products", product_ids=["n1", "a1", "n2"], sort_by="rating.average_score")["product_ids"] == ["n2", "n1", "a1"]
    assert call(ep, "filter_by_applicable_coupons", coupon_names=["Same-brand: ¥25 off every ¥200"])["product_ids"] == ["n1"]
    # Zhejiang (east) -> Beijing (north) is 2 days, SF Express 2 days faster, never under 1
    assert call(ep, "calculate_transport_time", product_id="n1", destination_address="beijing")["transport_days"] == 1
    # Guangdong (south) -> Beijing is 3 days, China Post 2 slower
    assert call(ep, "calculate_transport_time", product_id="n2", destination_address="Beijing")["transport_days"] == 5
    assert "error" in call(ep, "add_product_to_cart", product_id="n2", quantity=2)  # 1 in stock
    cart = call(ep, "add_product_to_cart", product_id="n1")
    assert cart["summary"] == {"total_items_count": 1, "total_price": 450.0}
    # two ¥25-off-¥200 coupons need a ¥400 cart: 450 is enough; a VIP coupon needs VIP status
    assert "error" in call(ep, "add_coupon_to_cart", coupon_name="VIP: ¥200 off every ¥1,000")
    assert "error" in call(ep, "add_coupon_to_cart", coupon_name="Same-brand: ¥25 off every ¥200", quantity=3)  # owns 2
    cart = call(ep, "add_coupon_to_cart", coupon_name="Same-brand: ¥25 off every ¥200", quantity=2)
    assert cart["summary"]["total_price"] == 400.0
    assert ep.score("done") == score_cart(ep.cart, {"ground_truth_products": [{"product_id": "n1"}],
                                                    "ground_truth_coupons": {"Same-brand: ¥25 off every ¥200": 2}})
    assert ep.score("done")["case_score"] == 1.0
    assert ep.step(ToolCall("add_product_to_cart", {})).startswith("Error: add_product_to_cart failed")
    assert env.aggregate({"matched_count": 1.5, "expected_count": 2.0, "case_score": 0.25}) == {
        "match_rate": 0.75, "weighted_average_case_score": 0.25}
    fresh = env.reset(task)  # episodes never share a cart
    assert fresh.cart["items"] == [] and fresh.score("")["case_score"] == 0.0


def test_missing_database_is_one_clear_error(shopping_db, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(DatabaseMissing) as err:
        ShoppingEnv(shopping_cfg(shopping_db, empty))
    msg = str(err.value)
    assert "Qwen/DeepPlanning" in msg and "database_level{1,2,3}.tar.gz" in msg and "benchmark.db_path=DIR" in msg
    cfg = compose_config(["benchmark=deepplanning_shopping", f"benchmark.path={shopping_db / 'tasks'}",
                          f"benchmark.db_path={empty}", "benchmark.env_options.levels=[1]"])
    with pytest.raises(FileNotFoundError, match="Qwen/DeepPlanning"):  # what `tip eval` reports in one line
        load_benchmark(eval_spec(cfg.benchmark, cfg.eval, cfg.pair, cfg.agent, cfg.rollout))


# -------------------------------------------------------------------------------------------------------------- travel

META = {"org": "Hefei", "dest": ["Nanjing"], "days": 2, "people_number": 2, "room_number": 1,
        "hard_constraints": {
            "hotel": {"constraint_type": "superlative_cheapest_star", "hotel_name": "Lake Hotel"},
            "meal": {"constraint_type": "superlative_must_eat_named", "restaurant_name": "Duck House"},
            "sights": {"constraint_type": "superlative_must_visit_named", "attraction_names": ["City Wall", "Museum"]},
            "train": {"outbound_train_no": "G1", "inbound_train_no": "G2"}}}


def act(slot, kind, **details):
    return {"time_slot": slot, "type": kind, "details": details}


def good_plan() -> dict:
    return {
        # transport 2 x (100 + 100) + 20 taxi = 420; hotel 1 room x 300; meals 2 x (50 + 40 + 60) = 300; sights 2 x 30
        "budget_summary": {"transportation": 420, "accommodation": 300, "meals": 300, "attractions_and_tickets": 60,
                           "other": 0, "total_estimated_budget": 1080, "currency": "CNY"},
        "daily_plans": [
            {"day_number": 1, "current_city": "from Hefei to Nanjing",
             "accommodation": {"name": "Lake Hotel", "price_per_night": 300},
             "activities": [
                 act("08:00-09:00", "travel_intercity_public", mode="train", number="G1", **{"from": "Hefei", "to": "Nanjing"}, cost=100),
                 act("09:00-09:30", "travel_city", **{"from": "Nanjing Station", "to": "Lake Hotel"}, cost=20),
                 act("10:00-12:00", "attraction", name="City Wall", city="Nanjing", cost=30),
                 act("12:00-13:00", "meal", meal_type="lunch", name="Duck House", cost=50),
                 act("18:00-19:00", "meal", meal_type="dinner", name="Noodle Bar", cost=40),
                 act("20:00-23:00", "hotel", activity="rest", name="Lake Hotel")]},
            {"day_number": 2, "current_city": "from Nanjing to Hefei",
             "activities": [
                 act("09:00-11:00", "attraction", name="Museum", city="Nanjing", cost=0),
                 act("11:30-12:30", "meal", meal_type="lunch", name="Dumpling Hall", cost=60),
                 act("17:00-18:00", "travel_intercity_public", mode="train", number="G2", **{"from": "Nanjing", "to": "Hefei"}, cost=100)]},
        ]}


SANDBOX = {
    "hotels": [{"name": "Lake Hotel", "hotel_star": "3", "brand": "Lake", "price": "300"}],
    "attractions": [{"attraction_name": "City Wall", "city": "Nanjing", "attraction_type": "History"},
                    {"attraction_name": "Museum", "city": "Nanjing", "attraction_type": "Museum"}],
    "restaurants": [{"restaurant_name": n, "opening_time": "10:00", "closing_time": close, "latitude": lat,
                     "longitude": "118.8"}
                    for n, lat, close in (("Duck House", "32.00", "21:00"), ("Noodle Bar", "32.05", "21:00"),
                                          ("Dumpling Hall", "32.50", "13:30"))],
    "trains": [{"train_no": "G1", "origin_city": "Hefei", "destination_city": "Nanjing", "dep_date": "2025-11-12", "seat_class": "second"},
               {"train_no": "G2", "origin_city": "Nanjing", "destination_city": "Hefei", "dep_date": "2025-11-13", "seat_class": "second"}],
}


def test_travel_checkers_pass_a_good_plan():
    checks = commonsense_checks(good_plan(), META, SANDBOX)
    failed = {d: [k for k, ok in c.items() if not ok] for d, c in checks.items() if not all(c.values())}
    assert failed == {}
    assert checks["sandbox"].keys() == {"hotels_from_search", "attractions_from_search", "restaurants_from_search",
                                        "intercity_from_search"}
    assert hard_checks(good_plan(), META) == {"hotel": True, "meal": True, "sights": True, "train": True}
    s = score_plan(good_plan(), META, SANDBOX)
    assert (s["commonsense_score"], s["personalized_score"], s["composite_score"], s["case_acc"]) == (1, 1, 1, 1)


def mutate(path_fn):
    plan = good_plan()
    path_fn(plan)
    return plan


@pytest.mark.parametrize("change, dimension", [
    (lambda p: p["daily_plans"][0]["activities"][3].update(time_slot="11:30-13:00"), "time"),  # overlaps the visit
    (lambda p: p["daily_plans"][1]["activities"][1]["details"].update(name="Noodle Bar"), "diversity"),
    (lambda p: p["budget_summary"].update(meals=250, total_estimated_budget=1030), "cost"),
    (lambda p: p["daily_plans"][1]["activities"][1].update(time_slot="13:00-14:00"), "business_hours"),  # closes 13:30
    (lambda p: p["daily_plans"][0]["activities"][4].update(time_slot="18:00-18:10"), "duration"),
    (lambda p: p["daily_plans"][0]["activities"].pop(), "structure"),  # day 1 does not end at the hotel
    (lambda p: p["daily_plans"].pop(), "route"),
])
def test_each_broken_rule_costs_its_dimension(change, dimension):
    plan = mutate(change)
    checks = commonsense_checks(plan, META, SANDBOX)
    assert not all(checks[dimension].values())
    s = score_plan(plan, META, SANDBOX)
    assert s[f"commonsense/{dimension}"] == 0.0 and s["case_acc"] == 0.0
    broken = sum(1 for d, c in checks.items() if not all(c.values()))
    assert s["commonsense_score"] == pytest.approx(1 - broken / 8)


def test_hard_constraints_are_all_or_nothing():
    plan = mutate(lambda p: p["daily_plans"][0]["accommodation"].update(name="Other Hotel"))
    assert hard_checks(plan, META)["hotel"] is False
    s = score_plan(plan, META, {k: v for k, v in SANDBOX.items() if k != "hotels"})  # no hotel table: no sandbox check
    assert s["personalized_score"] == 0.0 and s["commonsense_score"] == 1.0 and s["composite_score"] == 0.5
    swapped = mutate(lambda p: p["daily_plans"][0]["activities"][0]["details"].update(number="G2"))
    assert hard_checks(swapped, META)["train"] is False
    assert score_plan(None, META, SANDBOX)["composite_score"] == 0.0


@pytest.fixture
def travel_db(tmp_path, shared_data) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(shared_data / "deepplanning" / "travel_tool_schema_en.json", tasks)
    rows = [{"id": str(i), "query": f"Trip {i}", "meta_info": META} for i in range(10)]
    (tasks / "travel_query_en.json").write_text(json.dumps(rows))
    for i in range(10):
        folder = tmp_path / "db" / "database_en" / f"id_{i}"
        for name, table in SANDBOX.items():
            sub = {"hotels": "hotels/hotels.csv", "attractions": "attractions/attractions.csv",
                   "restaurants": "restaurants/restaurants.csv", "trains": "trains/trains.csv"}[name]
            (folder / sub).parent.mkdir(parents=True, exist_ok=True)
            cols = list(table[0])
            (folder / sub).write_text(",".join(cols) + "\n" + "".join(",".join(r[c] for c in cols) + "\n" for r in table))
    return tmp_path


def test_travel_env_split_tools_and_scoring(travel_db):
    def cfg(split):
        return DatasetConfig(name="benchmark", env="deepplanning_travel", path=str(travel_db / "tasks" / "travel_query_en.json"),
                             split=split, db_path=str(travel_db / "db"), env_options={"converter": "unused"})
    train, test = TravelEnv(cfg("train")).tasks(), TravelEnv(cfg("test")).tasks()
    assert (len(train), len(test)) == (8, 2) and not {t.id for t in train} & {t.id for t in test}
    env = TravelEnv(cfg("test"))
    ep = env.reset(test[0])
    assert len(ep.tools) == 9
    trains = json.loads(ep.step(ToolCall("query_train_info", {"origin": "hefei", "destination": "Nanjing", "depDate": "2025-11-12"})))
    assert [t["train_no"] for t in trains] == ["G1"]
    near = json.loads(ep.step(ToolCall("recommend_restaurants", {"latitude": "32.48", "longitude": "118.8"})))
    assert near[0]["restaurant_name"] == "Dumpling Hall"
    assert ep.step(ToolCall("search_location", {"place_name": "x"})).startswith("Error: search_location failed")
    assert ep.score(f"Here is the plan: <JSON>{json.dumps(good_plan())}</JSON>")["case_acc"] == 1.0
    seen = []
    ep.convert = lambda text: seen.append(text) or good_plan()  # a Markdown plan goes through the converter
    assert ep.score("**Day 1:** ...")["composite_score"] == 1.0 and seen == ["**Day 1:** ..."]
    assert ep.score("")["plan_parsed"] == 0.0
