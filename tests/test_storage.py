"""Storage (section 6): the rules history and the requests storage, without a server or a clock to wait on."""

from __future__ import annotations

import json
import os
import threading

import pytest

import reqapi
from conftest import RULES


def rules(document: dict, source: str = "rules.json") -> reqapi.Rules:
    return reqapi.parse_rules(document, source)


def list_options(**fields) -> reqapi.ListOptions:
    return reqapi.ListOptions(fields.pop("namespace", None), fields.pop("fields", ()), fields.pop("labels", ()),
                              reqapi.JSON_OUTPUT, **fields)


def test_install_replaces_the_current_generation_and_keeps_the_old_ones():
    history = reqapi.RulesHistory()
    first = history.current
    assert history.install(reqapi.DEFAULT_RULES) is False          # the same rules from the same source
    assert history.install(rules(RULES)) is True
    assert history.current is not first and history.current.rules.source == "rules.json"
    assert history.at(first.resource_version) is first
    assert history.at("12345") is None


def test_the_history_forgets_the_oldest_generations():
    history = reqapi.RulesHistory()
    first = history.current.resource_version
    for index in range(reqapi.RulesHistory.LENGTH):
        history.install(rules({"defaults": {"cpu": f"{index + 1}m"}}))
    assert history.at(first) is None
    assert history.at(history.current.resource_version) is history.current


def test_a_waiting_watch_wakes_on_a_change_and_on_close():
    history = reqapi.RulesHistory()
    seen = history.current
    assert history.wait_for_change(seen, 0) is None                # nothing changed
    woke: list = []
    waiter = threading.Thread(target=lambda: woke.append(history.wait_for_change(seen, 30)))
    waiter.start()
    history.install(rules(RULES))
    waiter.join(30)
    assert woke == [history.current]
    waiter = threading.Thread(target=lambda: woke.append(history.wait_for_change(history.current, 30)))
    waiter.start()
    history.close()
    waiter.join(30)
    assert not waiter.is_alive() and woke[-1] is None and history.closed


def test_a_generation_selects_named_workloads_and_a_pinned_one():
    generation = reqapi.Generation(rules(RULES))
    assert sorted(generation.select(None, (), ())) == [("default", "nightly-report"), ("shop", "checkout"),
                                                       ("shop", "search")]
    assert sorted(generation.select("shop", (), ())) == [("shop", "checkout"), ("shop", "search")]
    pinned = reqapi.parse_field_selector("metadata.name=anything")
    assert list(generation.select("prod-eu", pinned, ())) == [("prod-eu", "anything")]
    assert generation.select(None, pinned, ()) == {}                 # no namespace: nothing to pin
    assert generation.select(None, (), reqapi.parse_label_selector("app=web")) == {}   # objects have no labels
    assert generation.prediction("shop", "checkout") is generation.prediction("shop", "checkout")


def test_list_pages_with_continue_tokens_and_refuses_forgotten_ones():
    storage = reqapi.RequestsStorage(reqapi.RulesHistory(rules(RULES)))
    page = storage.list(list_options(limit=2))
    assert [key for key, _ in page.items] == [("default", "nightly-report"), ("shop", "checkout")]
    assert page.remaining == 1 and page.continue_token
    version, after = reqapi.decode_continue(page.continue_token)
    rest = storage.list(list_options(limit=2, continue_version=version, continue_after=after))
    assert [key for key, _ in rest.items] == [("shop", "search")] and rest.continue_token == ""
    with pytest.raises(reqapi.HTTPError) as expired:
        storage.list(list_options(continue_version="99", continue_after=after))
    assert expired.value.code == 410 and "continue parameter is too old" in expired.value.message
    with pytest.raises(reqapi.HTTPError) as exact:
        storage.list(list_options(exact_version="99"))
    assert exact.value.code == 410 and exact.value.message.startswith("too old resource version: 99 ")


def test_a_watch_starts_with_the_items_then_follows_changes_until_closed():
    history = reqapi.RulesHistory(rules(RULES))
    storage = reqapi.RequestsStorage(history)
    events = storage.watch(list_options(namespace="shop", watch=True, allow_bookmarks=True), timeout=60)
    assert [(change.type, change.key) for change in (next(events), next(events))] == [
        ("ADDED", ("shop", "checkout")), ("ADDED", ("shop", "search"))]
    changed = dict(RULES, rules=[rule for rule in RULES["rules"] if rule["id"] != "search"])
    history.install(rules(changed))
    change = next(events)
    while change is None:                     # heartbeats until the waiting loop sees the change
        change = next(events)
    assert (change.type, change.key) == ("DELETED", ("shop", "search"))
    history.close()
    rest = [change for change in events if change is not None]
    assert [change.type for change in rest] == ["BOOKMARK"]
    assert rest[0].resource_version == history.current.resource_version


def test_a_watch_from_an_unknown_resource_version_is_one_expired_change():
    storage = reqapi.RequestsStorage(reqapi.RulesHistory(rules(RULES)))
    changes = list(storage.watch(list_options(watch=True, resource_version="99"), timeout=60))
    assert [change.type for change in changes] == ["EXPIRED"]


def test_a_watch_from_a_known_resource_version_replays_the_difference():
    history = reqapi.RulesHistory(rules(RULES))
    start = history.current.resource_version
    history.install(rules(dict(RULES, defaults={"cpu": "100m", "memory": "100Mi"},
                               rules=RULES["rules"][:3] + [dict(RULES["rules"][3], cpu="3")])))
    history.close()                           # the watch then ends after its replay
    storage = reqapi.RequestsStorage(history)
    changes = [change for change in storage.watch(list_options(watch=True, resource_version=start), timeout=60)
               if change is not None]
    assert [(change.type, change.key) for change in changes] == [
        ("DELETED", ("default", "nightly-report")), ("MODIFIED", ("shop", "search"))]


def many_named(count: int, cpu: str) -> dict:
    return {"defaults": {"cpu": "100m", "memory": "100Mi"},
            "rules": [{"id": f"w{index}", "namespace": "load", "name": f"w-{index:04d}", "cpu": cpu}
                      for index in range(count)]}


def test_many_watches_share_one_selection_one_difference_and_one_encoding_of_a_change(monkeypatch, tmp_path):
    """Regression: each open watch selected, compared and encoded a big rules change on its own
    (500 watches x 10,000 workloads blocked the server).  Now a change is worked out once."""
    history = reqapi.RulesHistory(rules(many_named(300, "1")))
    storage = reqapi.RequestsStorage(history)
    fd = os.open(os.devnull, os.O_WRONLY)
    access, metrics = reqapi.Access(reqapi.AlwaysAllow()), reqapi.Metrics()
    api = reqapi.Api(storage, access, reqapi.Health(history, access, metrics), metrics, reqapi.Logger(fd=fd), 300)
    monkeypatch.setattr(reqapi.time, "time", lambda: 1_800_000_000.0)     # one second for every encoding
    options = list_options(namespace="load", watch=True, resource_version=history.current.resource_version)
    streams = [api.watch(options).events for _ in range(20)]
    assert all(next(stream) is None for stream in streams)                 # nothing new: all caught up
    calls = {"select": 0, "differences": 0, "encode": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    history.install(rules(many_named(300, "2")))                            # 300 MODIFIED
    monkeypatch.setattr(reqapi.Generation, "_select", counting("select", reqapi.Generation._select))
    monkeypatch.setattr(reqapi, "_differences", counting("differences", reqapi._differences))
    monkeypatch.setattr(reqapi, "requests_object", counting("encode", reqapi.requests_object))
    seen = []
    for stream in streams:
        events = []
        for event in stream:
            if event is None:
                break
            events.append(json.loads(event))
        seen.append(events)
    assert all(len(events) == 300 and events == seen[0] for events in seen)
    assert seen[0][0]["type"] == "MODIFIED" and seen[0][0]["object"]["resources"]["cpu"] == "2"
    assert calls == {"select": 1, "differences": 1, "encode": 300}, calls


# ---------------------------------------------------------------------------------------
# Bounded by bytes (issue 12, items 4 and 5): the memo of predictions and the history of
# generations, counted with tracemalloc (bytes, the same on any machine), never with a clock.
# ---------------------------------------------------------------------------------------

from bench import traced  # noqa: E402

MiB = 1024 * 1024


def allocated_by(action) -> int:
    """Bytes that stay allocated after `action` (what it built and something still holds)."""
    return traced(action)[1]


def long_name(index: int) -> str:
    return f"w{index}-" + "x" * 240            # a fresh 250-character string, as a request's path makes it


def test_the_prediction_memo_is_bounded_by_bytes_whatever_the_names():
    # 200,000 distinct long names took 124 MB when the memo was bounded by entries (65,536).
    generation = reqapi.Generation(rules(RULES))

    def ask(count):
        for index in range(count):
            assert generation.prediction("prod-eu", long_name(index)).rule == "default"
    kept = allocated_by(lambda: ask(40_000))                # ~19 MB of entries asked for
    print(f"the memo kept {kept / MiB:.1f} MiB")
    assert kept <= 4 * MiB + MiB // 4, kept                 # PREDICTION_MEMO_BYTES, and a dict's slack
    assert reqapi.PREDICTION_MEMO_BYTES == 4 * MiB


def test_a_prediction_memo_entry_costs_no_more_than_counted():
    generation = reqapi.Generation(rules(RULES))
    count = 5_000
    kept = allocated_by(lambda: [generation.prediction("prod-eu", long_name(index)) for index in range(count)])
    counted = count * (reqapi.PREDICTION_ENTRY_BYTES + len("prod-eu") + len(long_name(0)))
    assert counted < reqapi.PREDICTION_MEMO_BYTES                  # nothing was emptied on the way
    assert kept <= counted, (kept / count, counted / count)


def documents_of(count: int, size: int) -> list[dict]:
    """`count` different rules files of `size` rules each (a mix of exact names and globs)."""
    return [{"rules": [{"id": f"r{index}", "namespace": f"team-{index % 50}",
                        "name": f"svc-{index}" if index % 2 else f"svc-{index}-*", "cpu": f"{version + 1}m"}
                       for index in range(size)]} for version in range(count)]


def test_a_replaced_generation_keeps_its_answers_but_not_its_lanes_or_memos():
    history = reqapi.RulesHistory(rules(RULES))
    old = history.current
    for index in range(300):
        old.prediction("prod-eu", f"web-{index}")
    pinned = reqapi.parse_field_selector("metadata.name=pay-api")
    before = (dict(old.select(None, (), ())), dict(old.select("prod-eu", pinned, ())),
              old.prediction("prod-eu", "pay-api"), old.prediction("shop", "checkout"))
    history.install(rules(dict(RULES, defaults={"cpu": "300m", "memory": "100Mi"})))
    assert history.at(old.resource_version) is old and old.retired and not history.current.retired
    after = (dict(old.select(None, (), ())), dict(old.select("prod-eu", pinned, ())),
             old.prediction("prod-eu", "pay-api"), old.prediction("shop", "checkout"))
    assert after == before and before[1] == {("prod-eu", "pay-api"): reqapi.Prediction("500m", "512Mi", "prod-api")}
    # What it keeps is the rules without lanes, and no memo grows any more.
    assert lanes_of(old.rules) == [] and lanes_of(history.current.rules) != []
    # (300 memoised predictions would keep ~70 KB; a few hundred bytes are the interpreter's own.)
    assert allocated_by(lambda: [old.prediction("prod-eu", f"web-{index}") for index in range(300)]) < 4096


def lanes_of(compiled: reqapi.Rules) -> list:
    return [lane for lanes in compiled._by_namespace.values() for lane in lanes] + list(compiled._wild)


def test_a_retired_generation_keeps_no_more_than_its_estimate():
    def retired() -> reqapi.Generation:
        generation = reqapi.Generation(rules(documents_of(1, 4_000)[0]))
        generation.retire()
        return generation
    holder: list = []
    kept = allocated_by(lambda: holder.append(retired()))
    assert kept <= holder[0].memory < holder[0].rules.memory, (kept, holder[0].memory)


def test_reloads_under_traffic_keep_at_most_the_history_budget():
    # Each reload under traffic added 88 MB when past generations kept their memos and lanes.
    documents = documents_of(8, 3_000)

    def reload_under_traffic(history):
        for document in documents:
            history.install(rules(document))
            for index in range(2_000):                          # traffic: the memo of predictions fills
                history.current.prediction("team-7", f"web-{index}")

    history = reqapi.RulesHistory(rules(RULES))
    kept = allocated_by(lambda: reload_under_traffic(history))
    print(f"8 reloads of 3,000 rules under traffic kept {kept / MiB:.1f} MiB")
    # Each file compiles to ~1.5 MiB and its memo holds ~0.4 MiB: ~12 MiB if every generation kept them.
    assert kept <= 8 * MiB, kept / MiB
    past = [history.at(reqapi.resource_version_of(rules(document).digest)) for document in documents]
    kept_past = [generation for generation in past[:-1] if generation is not None]
    assert past[-1] is history.current and 1 <= len(kept_past) < 7
    assert sum(generation.memory for generation in kept_past) <= reqapi.RulesHistory.MAX_BYTES
    # What stays: the current generation (its rules and its memo) and the retired ones in their budget.
    assert kept <= history.current.memory + reqapi.PREDICTION_MEMO_BYTES + reqapi.RulesHistory.MAX_BYTES
