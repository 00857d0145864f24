"""DeepPlanning shopping: find the products a request describes, fill the cart, apply the best coupons.

The database (one `case_<id>/` per task, per level: `database_level{1,2,3}/`) holds `products.jsonl` (one product a
line: product_id, name, brand, color, size, price, stock_quantity, sales_volume {monthly, total}, rating
{average_score, total_reviews, ...}, applicable_coupons [names], shipping_info {origin, provider}, ...),
`user_info.json` (address, measurements, `coupons` {name: count}, `is_vip`), optionally `cart.json` (the start
cart) and `validation_cases.json` (the answer key: `ground_truth_products` [{product_id, ...}] and
`ground_truth_coupons` {name: count}). The 15 tools follow the upstream schemas (../shared/data/deepplanning/
shopping_tool_schema.json); this is tip's own implementation of their documented behaviour. The cart lives in the
episode, so parallel episodes never share one.

Scoring, as upstream's evaluation: a product counts when its id is in the cart, a coupon when its name is used
with exactly the expected count; `score` = matched / expected, `case_score` = 1 when all are matched (extra cart
items are not penalised). Over a benchmark: `match_rate` = total matched / total expected,
`weighted_average_case_score` = the mean case_score over all cases (what upstream's per-level average weighted by
case count comes to).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tip_cli.config.schema import ConfigError, DatasetConfig, PairConfig
from tip_cli.envs.base import Environment, Episode, Resolve, Task, dumps
from tip_cli.envs.deepplanning.common import find_database, load_json, missing

SCHEMA_FILE = "shopping_tool_schema.json"
VALID_COUPONS = (  # the coupon names the benchmark defines
    "Cross-store: ¥30 off every ¥300", "Cross-store: ¥60 off every ¥500", "Cross-store: ¥120 off every ¥900",
    "Cross-store: ¥200 off every ¥1,200", "Cross-store: ¥300 off every ¥1,500", "Same-brand: ¥25 off every ¥200",
    "Same-brand: ¥60 off every ¥400", "Same-brand: ¥180 off every ¥1,000", "Same-brand: ¥300 off every ¥1,200",
    "VIP: ¥200 off every ¥1,000",
)
SEARCH_FIELDS = ("brand", "color", "size", "thickness", "elasticity", "version_type", "collar_type", "suitable_season",
                 "target_demographic", "name")
BM25_MIN_SCORE = 2.0  # search returns products scoring above this
# delivery days between regions, by origin then destination region; provinces map to regions
REGIONS = {
    "NC": "beijing tianjin hebei shanxi inner_mongolia", "NE": "liaoning jilin heilongjiang",
    "EC": "shanghai jiangsu zhejiang anhui fujian jiangxi shandong", "CC": "henan hubei hunan",
    "SC": "guangdong guangxi hainan hongkong macau taiwan", "SW": "sichuan chongqing guizhou yunnan tibet",
    "NW": "shaanxi gansu qinghai ningxia xinjiang",
}
PROVINCE_REGION = {p.replace("_", " "): r for r, ps in REGIONS.items() for p in ps.split()}
PROVINCE_ALIASES = {"neimenggu": "inner mongolia", "xizang": "tibet", "xianggang": "hongkong", "aomen": "macau",
                    "北京": "beijing", "上海": "shanghai", "广东": "guangdong", "浙江": "zhejiang", "江苏": "jiangsu"}
ORDER = ("NC", "NE", "EC", "CC", "SC", "SW", "NW")
DAYS = [[1, 2, 2, 2, 3, 3, 3], [2, 1, 3, 3, 4, 4, 4], [2, 3, 1, 2, 2, 3, 4], [2, 3, 2, 1, 2, 2, 3],
        [3, 4, 2, 2, 1, 3, 4], [3, 4, 3, 2, 3, 1, 3], [3, 4, 4, 3, 4, 3, 1]]
PROVIDER_DAYS = {"sf_express": -2, "sf": -2, "jd_logistics": -1, "jd": -1, "yto_express": 1, "zto_express": 1,
                 "sto_express": 1, "yunda_express": 1, "cainiao": 1, "china_post": 2, "ems": 0, "deppon_express": 0,
                 "default": 0}


def score_cart(cart: dict, key: dict) -> dict[str, float]:
    """Upstream's per-case score of a final cart against the answer key (validation_cases.json)."""
    in_cart = {i.get("product_id") for i in cart.get("items", [])} - {None}
    expected_products = {p.get("product_id") for p in key.get("ground_truth_products", [])} - {None}
    expected_coupons = key.get("ground_truth_coupons", {})
    matched_coupons = sum(c.get("coupon_name") in expected_coupons
                          and int(c.get("quantity", 0)) == expected_coupons[c.get("coupon_name")]
                          for c in cart.get("used_coupons", []))
    matched = len(in_cart & expected_products) + matched_coupons
    expected = len(expected_products) + len(expected_coupons)
    extra = in_cart - expected_products
    return {
        "accuracy": float(matched == expected), "case_score": float(matched == expected),
        "score": matched / expected if expected else 0.0,
        "coupon_score": matched_coupons / len(expected_coupons) if expected_coupons else 0.0,
        "matched_count": float(matched), "expected_count": float(expected), "extra_products_count": float(len(extra)),
    }


class BM25:
    """Okapi BM25 over whitespace tokens (k1 1.5, b 0.75; negative idf floored at 0.25 x the mean idf)."""

    def __init__(self, docs: list[list[str]], k1: float = 1.5, b: float = 0.75, eps: float = 0.25):
        self.docs, self.k1, self.b = [Counter(d) for d in docs], k1, b
        self.lens = [len(d) for d in docs]
        self.avg = sum(self.lens) / max(1, len(docs))
        df = Counter(w for d in self.docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
        floor = eps * sum(self.idf.values()) / max(1, len(self.idf))
        self.idf = {w: (v if v >= 0 else floor) for w, v in self.idf.items()}

    def scores(self, query: list[str]) -> list[float]:
        out = []
        for doc, n in zip(self.docs, self.lens, strict=True):
            s = 0.0
            for w in query:
                f = doc.get(w, 0)
                s += self.idf.get(w, 0.0) * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg)) if f else 0.0
            out.append(s)
        return out


def _field(product: dict, dotted: str) -> Any:
    value: Any = product
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _coupon_terms(name: str) -> tuple[float, float]:
    """(discount, threshold) of "Same-brand: ¥25 off every ¥200"."""
    found = re.search(r"¥([\d,]+)\s+off\s+every\s+¥([\d,]+)", name)
    if not found:
        raise ValueError(f"coupon {name!r} is not of the form '...: ¥D off every ¥T'")
    return float(found.group(1).replace(",", "")), float(found.group(2).replace(",", ""))


def _province(text: str) -> str | None:
    s = str(text).lower().replace(" province", "").replace(" city", "").strip()
    s = PROVINCE_ALIASES.get(s, s)
    if s in PROVINCE_REGION:
        return s
    return next((p for p in PROVINCE_REGION if p in s), next((v for k, v in PROVINCE_ALIASES.items() if k in s), None))


class ShoppingEpisode(Episode):
    def __init__(self, task: Task, case: dict, tools: list[dict], system: str):
        self.task, self.tools = task, tools
        self.products: dict[str, dict] = case["products"]
        self.user, self.key = case["user"], case["key"]
        self.cart: dict = json.loads(json.dumps(case.get("cart") or {}))
        self.cart.setdefault("items", [])
        self.cart.setdefault("used_coupons", [])
        self._bm25: BM25 | None = None
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": task.prompt}]

    # -- catalogue tools ------------------------------------------------------------------------------------------
    def _ids(self, args: dict) -> list[str]:
        ids = args.get("product_ids")
        return list(self.products) if not ids else [i for i in ids if i in self.products]

    def _match(self, args: dict, field: str, key: str) -> str:
        wanted = {str(v).strip().lower() for v in args[key]}
        return dumps({"product_ids": [i for i in self._ids(args)
                                      if str(self.products[i].get(field, "")).strip().lower() in wanted]})

    def call(self, name: str, a: dict[str, Any]) -> str:
        if name == "search_products":
            if self._bm25 is None:
                ids = list(self.products)
                self._bm25 = BM25([" ".join(str(self.products[i].get(f, "")) for f in SEARCH_FIELDS).lower().split()
                                   for i in ids])
            scores, ids = self._bm25.scores(str(a["query"]).lower().split()), list(self.products)
            hits = sorted((i for i, s in enumerate(scores) if s > BM25_MIN_SCORE), key=lambda i: -scores[i])
            return dumps({"product_ids": [ids[i] for i in hits][: int(a.get("limit", 20))]})
        if name == "filter_by_brand":
            return self._match(a, "brand", "brand_names")
        if name == "filter_by_color":
            return self._match(a, "color", "colors")
        if name == "filter_by_size":
            return self._match(a, "size", "sizes")
        if name == "filter_by_applicable_coupons":
            wanted = set(a["coupon_names"])
            return dumps({"product_ids": [i for i in self._ids(a)
                                          if wanted & set(self.products[i].get("applicable_coupons") or [])]})
        if name == "filter_by_range":
            ops = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__, "==": float.__eq__}
            if a["operator"] not in ops:
                raise ValueError(f"operator {a['operator']!r}; expected one of {', '.join(ops)}")
            op, value = ops[a["operator"]], float(a["value"])
            keep = [i for i in self._ids(a) if isinstance(_field(self.products[i], a["condition_key"]), int | float)
                    and op(float(_field(self.products[i], a["condition_key"])), value)]
            return dumps({"product_ids": keep})
        if name == "sort_products":
            key = a["sort_by"]
            ids = [i for i in self._ids(a) if _field(self.products[i], key) is not None]
            ids.sort(key=lambda i: _field(self.products[i], key), reverse=a.get("order", "desc") != "asc")
            return dumps({"product_ids": ids})
        if name == "get_product_details":
            return dumps([self.products.get(i, {"product_id": i, "error": "not found"}) for i in a["product_ids"]])
        if name == "calculate_transport_time":
            return self._transport(a)
        if name == "get_user_info":
            return dumps(self.user)
        if name == "get_cart_info":
            return dumps(self._summary())
        return self._cart_tool(name, a)

    def _transport(self, a: dict) -> str:
        product = self.products.get(a["product_id"])
        if product is None:
            return dumps({"error": f"Product with ID '{a['product_id']}' not found."})
        shipping = product.get("shipping_info") or {}
        origin, dest = _province(shipping.get("origin", "")), _province(a["destination_address"])
        if origin is None or dest is None:
            return dumps({"error": f"unknown province: {shipping.get('origin') if origin is None else a['destination_address']!r}; "
                                   "give the province in pinyin, e.g. guangdong"})
        provider = str(a.get("provider") or shipping.get("provider") or "default").lower().replace(" ", "_")
        days = DAYS[ORDER.index(PROVINCE_REGION[origin])][ORDER.index(PROVINCE_REGION[dest])]
        return dumps({"product_id": a["product_id"], "transport_days": max(1, days + PROVIDER_DAYS.get(provider, 0))})

    # -- the cart -------------------------------------------------------------------------------------------------
    def _base_total(self) -> float:
        return round(sum(float(i.get("price", 0.0)) * int(i.get("quantity", 0)) for i in self.cart["items"]), 2)

    def _summary(self) -> dict:
        discount = sum(_coupon_terms(c["coupon_name"])[0] * c["quantity"] for c in self.cart["used_coupons"])
        self.cart["summary"] = {"total_items_count": sum(i["quantity"] for i in self.cart["items"]),
                                "total_price": round(max(0.0, self._base_total() - discount), 2)}
        return self.cart

    def _cart_tool(self, name: str, a: dict) -> str:
        qty = a.get("quantity", 1)
        if not isinstance(qty, int | float) or qty <= 0:
            return dumps({"error": "quantity must be a positive number"})
        qty = int(qty)
        if name in ("add_product_to_cart", "delete_product_from_cart"):
            pid = a["product_id"]
            if pid not in self.products:
                return dumps({"error": f"Product not found: product_id '{pid}'"})
            item = next((i for i in self.cart["items"] if i["product_id"] == pid), None)
            if name == "add_product_to_cart":
                have, stock = (item["quantity"] if item else 0), int(self.products[pid].get("stock_quantity", 0))
                if have + qty > stock:
                    return dumps({"error": f"Insufficient stock: {stock} in stock, cart has {have}, cannot add {qty}"})
                if item is None:
                    item = {"product_id": pid, "name": self.products[pid].get("name", ""), "quantity": 0}
                    self.cart["items"].append(item)
                item["quantity"], item["price"] = have + qty, float(self.products[pid].get("price", 0.0))
            else:
                if item is None:
                    return dumps({"error": f"Product '{pid}' is not in the cart"})
                item["quantity"] -= qty
                self.cart["items"] = [i for i in self.cart["items"] if i["quantity"] > 0]
            return dumps(self._summary())
        coupon = a["coupon_name"]
        if coupon not in VALID_COUPONS:
            return dumps({"error": f"Coupon not found: '{coupon}'. Valid coupons are: {', '.join(VALID_COUPONS)}"})
        used = next((c for c in self.cart["used_coupons"] if c["coupon_name"] == coupon), None)
        have = used["quantity"] if used else 0
        if name == "delete_coupon_from_cart":
            if used is None:
                return dumps({"error": f"Coupon '{coupon}' is not in the cart"})
            used["quantity"] -= qty
            self.cart["used_coupons"] = [c for c in self.cart["used_coupons"] if c["quantity"] > 0]
            return dumps(self._summary())
        owned = int((self.user.get("coupons") or {}).get(coupon, 0))
        if have + qty > owned:
            return dumps({"error": f"Insufficient coupon quantity: user owns {owned} of '{coupon}', cart uses {have}"})
        if coupon.startswith("VIP:") and not self.user.get("is_vip", False):
            return dumps({"error": f"VIP coupon '{coupon}' requires VIP status, but user is not a VIP"})
        counts = {c["coupon_name"]: c["quantity"] for c in self.cart["used_coupons"]} | {coupon: have + qty}
        needed = sum(_coupon_terms(n)[1] * q for n, q in counts.items())  # every coupon use needs its own threshold
        if self._base_total() < needed:
            return dumps({"error": f"Cart total {self._base_total()} is insufficient for this combination of coupons "
                                   f"(requires at least {needed})"})
        if used is None:
            self.cart["used_coupons"].append({"coupon_name": coupon, "quantity": qty})
        else:
            used["quantity"] = have + qty
        return dumps(self._summary())

    def score(self, final: str) -> dict[str, float]:
        return score_cart(self.cart, self.key)


SYSTEM = ("You are a shopping assistant. Use the tools to find the products the user asks for, check every "
          "constraint, add exactly the right products to the cart, and apply the coupons that give the lowest total "
          "price. When the cart is final, reply with a short summary and no tool call.")


def is_case_root(d: Path) -> bool:
    return any((c / "products.jsonl").is_file() for c in d.glob("case_*"))


def load_case(case_dir: Path) -> dict:
    products = {}
    for line in (case_dir / "products.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            p = json.loads(line)
            products[p["product_id"]] = p
    user = load_json(case_dir / "user_info.json") if (case_dir / "user_info.json").is_file() else {}
    cart = load_json(case_dir / "cart.json") if (case_dir / "cart.json").is_file() else {}
    key = load_json(case_dir / "validation_cases.json")
    return {"products": products, "user": user, "cart": cart if isinstance(cart, dict) else {}, "key": key}


class ShoppingEnv(Environment):
    """`path`: the folder with the task files (shopping_level{L}_query.json or upstream's level_{L}_query_meta.json)
    and shopping_tool_schema.json; `env_options.levels` (default [1, 2, 3]); `db_path`: the database."""

    def __init__(self, cfg: DatasetConfig, pair: PairConfig | None = None, resolve: Resolve | None = None):
        folder = Path(cfg.path or "").expanduser()
        levels = list(cfg.env_options.get("levels", [1, 2, 3]))
        self._tasks = []
        for level in levels:
            files = [folder / f"shopping_level{level}_query.json", folder / f"level_{level}_query_meta.json"]
            file = next((f for f in files if f.is_file()), None)
            if file is None:
                raise ConfigError(f"{cfg.name}.path={cfg.path!r}: no task file for level {level} ({files[0].name})")
            self._tasks += [Task(f"level{level}-{q['id']}", q["query"], {"level": level, "case": f"case_{q['id']}"})
                            for q in load_json(file)]
        self.tools = load_json(folder / SCHEMA_FILE)
        self.roots = {lv: find_database(cfg, f"shopping level {lv}", is_case_root, [f"database_level{lv}"],
                                        [f"shoppingplanning/database_zip/database_level{lv}.tar.gz"]) for lv in levels}
        for t in self._tasks:
            if not (self.roots[t.meta["level"]] / t.meta["case"] / "products.jsonl").is_file():
                raise missing(cfg, f"{t.meta['case']} of level {t.meta['level']}", [self.roots[t.meta["level"]]],
                              "that database has no case for this task")
        self.cfg = cfg

    def tasks(self) -> list[Task]:
        return self._tasks

    def reset(self, task: Task) -> ShoppingEpisode:
        case = load_case(self.roots[task.meta["level"]] / task.meta["case"])
        return ShoppingEpisode(task, case, self.tools, SYSTEM)

    def aggregate(self, means: dict[str, float]) -> dict[str, float]:
        return {"match_rate": means["matched_count"] / means["expected_count"] if means["expected_count"] else 0.0,
                "weighted_average_case_score": means["case_score"]}
