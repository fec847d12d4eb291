"""Endpoints over real HTTPS: every route, every error, Accept negotiation, ETags, lists, watches."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import threading
import time
import warnings

import pytest

import reqapi

from conftest import AGGREGATED_ACCEPT, GV, RULES, TABLE_ACCEPT, write_rules

OBJECT = f"{GV}/namespaces/default/requests/web"


def assert_status(answer, code: int, reason: str, message_part: str = "") -> dict:
    assert answer.status == code, answer
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["kind"] == "Status" and body["apiVersion"] == "v1" and body["status"] == "Failure", body
    assert body["code"] == code and body["reason"] == reason, body
    assert body["metadata"] == {}
    assert message_part in body["message"], body["message"]
    assert "Traceback" not in body["message"]
    return body


# Objects

def test_object_has_the_shape_and_defaults(server):
    answer = server.get(OBJECT)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    obj = answer.json()
    assert obj["kind"] == "Requests" and obj["apiVersion"] == "k8s.wujiuye.com/v1beta1"
    assert obj["resources"] == {"cpu": "100m", "memory": "100Mi"}
    meta = obj["metadata"]
    assert (meta["name"], meta["namespace"]) == ("web", "default")
    assert meta["annotations"] == {"k8s.wujiuye.com/rule": "default"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert re.fullmatch(r"[1-9]\d*", meta["resourceVersion"])
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", meta["uid"])


def test_uid_is_stable_per_name_and_differs_between_names(server):
    first = server.get(OBJECT).json()["metadata"]["uid"]
    assert server.get(OBJECT).json()["metadata"]["uid"] == first
    assert server.get(f"{GV}/namespaces/other/requests/web").json()["metadata"]["uid"] != first
    assert server.get(f"{GV}/namespaces/default/requests/web2").json()["metadata"]["uid"] != first


def test_two_replicas_with_the_same_rules_agree(start_server, rules_file):
    first = start_server("--rules", str(rules_file))
    second = start_server("--rules", str(rules_file))
    for path in (f"{GV}/namespaces/shop/requests/checkout", f"{GV}/namespaces/prod-eu/requests/pay-api", OBJECT):
        a, b = first.get(path).json(), second.get(path).json()
        for key in ("uid", "resourceVersion", "annotations", "name", "namespace"):
            assert a["metadata"][key] == b["metadata"][key]
        assert a["resources"] == b["resources"]
    list_a, list_b = first.get(f"{GV}/requests").json(), second.get(f"{GV}/requests").json()
    assert list_a["metadata"]["resourceVersion"] == list_b["metadata"]["resourceVersion"]
    # A watch resumed on the other replica from the first one's resourceVersion makes sense: no 410.
    answer = second.get(f"{GV}/requests?watch=true&timeoutSeconds=1&resourceVersion="
                        f"{list_a['metadata']['resourceVersion']}")
    assert answer.status == 200 and b"ERROR" not in answer.body


def test_head_returns_headers_without_body(server):
    answer = server.get(OBJECT, method="HEAD")
    assert answer.status == 200 and answer.body == b""
    assert int(answer.headers["content-length"]) > 100


@pytest.mark.parametrize("namespace,fragment", [
    ("Default", "RFC 1123 label"),
    ("a_b", "RFC 1123 label"),
    ("-a", "RFC 1123 label"),
    ("a" * 64, "no more than 63 characters"),
    ("..", "may not be '..'"),
])
def test_bad_namespace_is_a_400_that_names_the_rule(server, namespace, fragment):
    body = assert_status(server.get(f"{GV}/namespaces/{namespace}/requests/web"), 400, "BadRequest", fragment)
    assert "namespace" in body["message"]
    assert_status(server.get(f"{GV}/namespaces/{namespace}/requests"), 400, "BadRequest", fragment)


@pytest.mark.parametrize("name,fragment", [
    ("Web", "RFC 1123 subdomain"),
    ("web_1", "RFC 1123 subdomain"),
    ("web.", "RFC 1123 subdomain"),
    ("a" * 254, "no more than 253 characters"),
    ("..", "may not be '..'"),
    ("%2e", "may not be '.'"),
    ("a%00b", "NUL"),
    ("a%25b", "'%'"),
])
def test_bad_name_is_a_400_that_names_the_rule(server, name, fragment):
    body = assert_status(server.get(f"{GV}/namespaces/default/requests/{name}"), 400, "BadRequest", fragment)
    assert body["message"].startswith("Name parameter invalid")


def test_invalid_utf8_after_percent_decoding_is_a_400(server):
    assert_status(server.get(f"{GV}/namespaces/default/requests/%ff%fe"), 400, "BadRequest", "UTF-8")


def test_unknown_paths_and_subresources_are_404_status(server):
    for path in ("/nope", f"{GV}/namespaces/default/requests/web/status", f"{GV}/namespaces/default",
                 "/apis/other.group/v1", f"{GV}/things"):
        body = assert_status(server.get(path), 404, "NotFound", "could not find the requested resource")
        assert body["details"] == {}


def test_core_api_is_a_404_status(server):
    assert_status(server.get("/api", {"Accept": AGGREGATED_ACCEPT}), 404, "NotFound", "no core (/api) group")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "BREW"])
def test_other_methods_are_405_with_allow(server, method):
    body = assert_status(server.get(OBJECT, method=method), 405, "MethodNotAllowed",
                         "does not allow this method on the requested resource")
    assert "read-only" in body["message"]
    assert server.get(OBJECT, method=method).headers["allow"] == "GET, HEAD"


def test_body_on_get_is_a_400(server):
    assert_status(server.get(OBJECT, body=b"{}", headers={"Content-Type": "application/json"}), 400,
                  "BadRequest", "must not have a body")


def test_accept_without_json_is_406(server):
    body = assert_status(server.get(OBJECT, {"Accept": "application/yaml"}), 406, "NotAcceptable",
                         "only the following media types are accepted")
    assert "application/json" in body["message"]
    assert_status(server.get(OBJECT, {"Accept": "application/vnd.kubernetes.protobuf"}), 406, "NotAcceptable")
    assert_status(server.get(f"{GV}", {"Accept": "text/html"}), 406, "NotAcceptable")


@pytest.mark.parametrize("accept", ["application/json", "*/*", "application/*", "application/json, */*",
                                    "text/html;q=0.9, application/json;q=0.8", ""])
def test_plain_json_accepts(server, accept):
    answer = server.get(OBJECT, {"Accept": accept} if accept else {})
    assert answer.status == 200 and answer.json()["kind"] == "Requests"


# Tables

@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_table_for_one_object(server, version):
    answer = server.get(OBJECT, {"Accept": f"application/json;as=Table;v={version};g=meta.k8s.io"})
    assert answer.status == 200
    assert answer.headers["content-type"] == f"application/json;as=Table;v={version};g=meta.k8s.io"
    table = answer.json()
    assert table["kind"] == "Table" and table["apiVersion"] == f"meta.k8s.io/{version}"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "CPU", "Memory", "Rule", "Age"]
    (row,) = table["rows"]
    assert row["cells"][:4] == ["web", "100m", "100Mi", "default"]
    assert re.fullmatch(r"\d+s", row["cells"][4])
    assert row["object"]["kind"] == "PartialObjectMetadata"
    assert row["object"]["metadata"]["name"] == "web"


def test_table_include_object(server):
    def row(include):
        return server.get(f"{OBJECT}?includeObject={include}", {"Accept": TABLE_ACCEPT}).json()["rows"][0]
    assert "object" not in row("None")
    assert row("Metadata")["object"]["kind"] == "PartialObjectMetadata"
    assert row("Object")["object"]["kind"] == "Requests"
    assert row("Object")["object"]["resources"] == {"cpu": "100m", "memory": "100Mi"}
    assert_status(server.get(f"{OBJECT}?includeObject=All", {"Accept": TABLE_ACCEPT}), 400, "BadRequest",
                  "includeObject")


# Lists

@pytest.fixture()
def rules_server(start_server, rules_file):
    return start_server("--rules", str(rules_file))


def test_lists_hold_the_named_workloads(rules_server):
    everything = rules_server.get(f"{GV}/requests").json()
    assert everything["kind"] == "RequestsList" and everything["apiVersion"] == "k8s.wujiuye.com/v1beta1"
    assert re.fullmatch(r"[1-9]\d*", everything["metadata"]["resourceVersion"])
    names = [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everything["items"]]
    assert names == [("default", "nightly-report"), ("shop", "checkout"), ("shop", "search")]
    shop = rules_server.get(f"{GV}/namespaces/shop/requests").json()
    assert [(i["metadata"]["name"], i["resources"]["cpu"], i["resources"]["memory"],
             i["metadata"]["annotations"]["k8s.wujiuye.com/rule"]) for i in shop["items"]] == [
        ("checkout", "2", "3Gi", "checkout"), ("search", "1500m", "1536Mi", "search")]
    assert rules_server.get(f"{GV}/namespaces/empty/requests").json()["items"] == []


def test_list_without_rules_is_empty_with_a_resource_version(server):
    listing = server.get(f"{GV}/namespaces/default/requests").json()
    assert listing["items"] == [] and listing["metadata"]["resourceVersion"]


def test_list_as_table(rules_server):
    table = rules_server.get(f"{GV}/requests?limit=500", {"Accept": TABLE_ACCEPT}).json()
    assert table["kind"] == "Table"
    assert [row["cells"][:4] for row in table["rows"]] == [
        ["nightly-report", "250m", "1Gi", "reports"], ["checkout", "2", "3Gi", "checkout"],
        ["search", "1500m", "1536Mi", "search"]]
    assert [row["object"]["metadata"]["namespace"] for row in table["rows"]] == ["default", "shop", "shop"]


def test_field_selectors(rules_server):
    def names(query):
        answer = rules_server.get(f"{GV}/requests?{query}")
        assert answer.status == 200, answer
        return [i["metadata"]["name"] for i in answer.json()["items"]]
    assert names("fieldSelector=metadata.name%3Dcheckout") == ["checkout"]
    assert names("fieldSelector=metadata.namespace%3Dshop") == ["checkout", "search"]
    assert names("fieldSelector=metadata.namespace%21%3Dshop") == ["nightly-report"]
    assert names("fieldSelector=metadata.name%3D%3Dsearch,metadata.namespace%3Dshop") == ["search"]
    # A name pinned in a known namespace is a workload too, even if no rule names it exactly.
    answer = rules_server.get(f"{GV}/namespaces/prod-eu/requests?fieldSelector=metadata.name%3Dpay-api").json()
    assert [(i["metadata"]["name"], i["resources"]["cpu"]) for i in answer["items"]] == [("pay-api", "500m")]


def test_unsupported_selectors_are_400(rules_server):
    assert_status(rules_server.get(f"{GV}/requests?fieldSelector=spec.cpu%3D1"), 400, "BadRequest",
                  "field label not supported: spec.cpu")
    assert_status(rules_server.get(f"{GV}/requests?fieldSelector=metadata.name"), 400, "BadRequest",
                  "metadata.name=checkout")
    assert_status(rules_server.get(f"{GV}/requests?labelSelector=Bad%20Key%3Dx"), 400, "BadRequest",
                  "invalid label key")
    assert_status(rules_server.get(f"{GV}/requests?labelSelector=app%20in%20()"), 400, "BadRequest",
                  "can't be empty")


def test_label_selectors_on_unlabelled_objects(rules_server):
    def count(selector):
        return len(rules_server.get(f"{GV}/requests?labelSelector={selector}").json()["items"])
    assert count("app%3Dweb") == 0
    assert count("app") == 0
    assert count("%21app") == 3
    assert count("app%21%3Dweb") == 3
    assert count("app%20notin%20(a,b)") == 3


def test_limit_and_continue_page_through_a_consistent_list(rules_server):
    first = rules_server.get(f"{GV}/requests?limit=2").json()
    assert [i["metadata"]["name"] for i in first["items"]] == ["nightly-report", "checkout"]
    assert first["metadata"]["remainingItemCount"] == 1
    token = first["metadata"]["continue"]
    second = rules_server.get(f"{GV}/requests?limit=2&continue={token}").json()
    assert [i["metadata"]["name"] for i in second["items"]] == ["search"]
    assert "continue" not in second["metadata"]
    assert_status(rules_server.get(f"{GV}/requests?continue=garbage!"), 400, "BadRequest", "continue")
    assert_status(rules_server.get(f"{GV}/requests?limit=x"), 400, "BadRequest", "limit")


# Watch

def read_watch(server, path, headers=None):
    answer = server.get(path, headers, timeout=30)
    assert answer.status == 200, answer
    assert answer.headers.get("transfer-encoding") == "chunked"
    return [json.loads(line) for line in answer.body.splitlines() if line.strip()]


def test_watch_starts_with_added_events_and_ends_at_timeout(rules_server):
    for flag in ("true", "1"):
        started = time.monotonic()
        events = read_watch(rules_server, f"{GV}/namespaces/shop/requests?watch={flag}&timeoutSeconds=1")
        assert time.monotonic() - started < 10
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("ADDED", "checkout"), ("ADDED", "search")]
        assert events[0]["object"]["kind"] == "Requests"


def test_watch_from_the_current_resource_version_sends_no_replay(rules_server):
    version = rules_server.get(f"{GV}/namespaces/shop/requests").json()["metadata"]["resourceVersion"]
    assert read_watch(rules_server, f"{GV}/namespaces/shop/requests?watch=true&timeoutSeconds=1"
                                    f"&resourceVersion={version}") == []


def test_watch_from_an_unknown_resource_version_is_410_expired(rules_server):
    (event,) = read_watch(rules_server, f"{GV}/requests?watch=true&timeoutSeconds=1&resourceVersion=12345")
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    assert "too old resource version: 12345" in event["object"]["message"]


def test_watch_of_one_name_as_table(rules_server):
    events = read_watch(rules_server, f"{GV}/namespaces/shop/requests?fieldSelector=metadata.name%3Dcheckout"
                                      f"&resourceVersion=0&watch=true&timeoutSeconds=1", {"Accept": TABLE_ACCEPT})
    (event,) = events
    assert event["type"] == "ADDED" and event["object"]["kind"] == "Table"
    assert event["object"]["rows"][0]["cells"][:4] == ["checkout", "2", "3Gi", "checkout"]


# PartialObjectMetadata: what client-go's metadata client and informers ask any resource for
# (its Accept headers, copied from client-go's metadata package). reqapi answered 406 before, and
# its watch events could not be decoded by the metadata client.
METADATA_ACCEPT = ("application/vnd.kubernetes.protobuf;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,"
                   "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json")
METADATA_LIST_ACCEPT = METADATA_ACCEPT.replace("PartialObjectMetadata;", "PartialObjectMetadataList;")


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_partial_object_metadata_for_get_list_and_watch(rules_server, version):
    accept = f"application/json;as=PartialObjectMetadata;g=meta.k8s.io;v={version}"
    one = rules_server.get(f"{GV}/namespaces/shop/requests/checkout", {"Accept": accept})
    assert one.status == 200 and one.headers["content-type"] == accept
    full = rules_server.get(f"{GV}/namespaces/shop/requests/checkout").json()
    partial = one.json()
    # creationTimestamp is the second each answer was made in: the two GETs may straddle one.
    assert partial["metadata"].pop("creationTimestamp") and full["metadata"].pop("creationTimestamp")
    assert partial == {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
                       "metadata": full["metadata"]}
    listed = rules_server.get(f"{GV}/namespaces/shop/requests?limit=1",
                              {"Accept": accept.replace("PartialObjectMetadata", "PartialObjectMetadataList")})
    assert listed.status == 200
    document = listed.json()
    assert document["kind"] == "PartialObjectMetadataList" and document["apiVersion"] == f"meta.k8s.io/{version}"
    assert document["metadata"]["continue"] and document["metadata"]["remainingItemCount"] == 1
    assert [(item["kind"], item["metadata"]["name"]) for item in document["items"]] == [
        ("PartialObjectMetadata", "checkout")]
    events = read_watch(rules_server, f"{GV}/namespaces/shop/requests?watch=1&timeoutSeconds=1", {"Accept": accept})
    assert [(e["type"], e["object"]["kind"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "PartialObjectMetadata", "checkout"), ("ADDED", "PartialObjectMetadata", "search")]


def test_the_metadata_clients_accept_headers(rules_server):
    listed = rules_server.get(f"{GV}/namespaces/shop/requests", {"Accept": METADATA_LIST_ACCEPT})
    assert listed.status == 200 and listed.json()["kind"] == "PartialObjectMetadataList"
    one = rules_server.get(f"{GV}/namespaces/shop/requests/checkout", {"Accept": METADATA_ACCEPT})
    assert one.json()["kind"] == "PartialObjectMetadata"
    # A list offered only the single-object kind (or the other way round) is not acceptable.
    assert_status(rules_server.get(f"{GV}/namespaces/shop/requests",
                                   {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}),
                  406, "NotAcceptable", "as=PartialObjectMetadataList")


def test_watch_sees_modified_added_and_deleted_after_a_reload(rules_server, rules_file):
    connection = rules_server.connection(timeout=30)
    connection.request("GET", f"{GV}/requests?watch=true&timeoutSeconds=20")
    response = connection.getresponse()
    buffer = b""

    def read_events(count):
        nonlocal buffer
        events = []
        while len(events) < count:
            chunk = response.read1(65536)        # http.client undoes the chunked framing
            assert chunk, "stream ended early"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    events.append(json.loads(line))
        return events

    initial = read_events(3)
    assert [e["type"] for e in initial] == ["ADDED"] * 3
    changed = json.loads(json.dumps(RULES))
    changed["rules"][2]["cpu"] = "3"                      # checkout: modified
    del changed["rules"][3]                               # search: deleted
    changed["rules"].append({"id": "cart", "namespace": "shop", "name": "cart", "cpu": "300m"})   # added
    write_rules(rules_file, changed)
    rules_server.signal(signal.SIGHUP)
    events = read_events(3)
    summary = sorted((e["type"], e["object"]["metadata"]["name"], e["object"]["resources"]["cpu"]) for e in events)
    assert summary == [("ADDED", "cart", "300m"), ("DELETED", "search", "1500m"), ("MODIFIED", "checkout", "3")]
    new_version = events[0]["object"]["metadata"]["resourceVersion"]
    assert new_version != initial[0]["object"]["metadata"]["resourceVersion"]
    assert rules_server.get(f"{GV}/requests").json()["metadata"]["resourceVersion"] == new_version
    connection.close()
    # Resuming from the old resourceVersion replays exactly the difference.
    old = initial[0]["object"]["metadata"]["resourceVersion"]
    resumed = read_watch(rules_server, f"{GV}/requests?watch=true&timeoutSeconds=1&resourceVersion={old}")
    assert sorted((e["type"], e["object"]["metadata"]["name"]) for e in resumed) == [
        ("ADDED", "cart"), ("DELETED", "search"), ("MODIFIED", "checkout")]


def test_watch_with_initial_events_ends_them_with_a_bookmark(rules_server):
    events = read_watch(rules_server, f"{GV}/namespaces/shop/requests?watch=true&timeoutSeconds=1"
                                      f"&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
                                      f"&allowWatchBookmarks=true")
    assert [e["type"] for e in events[:3]] == ["ADDED", "ADDED", "BOOKMARK"]
    assert events[2]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# Discovery

def test_aggregated_discovery_v2(server):
    answer = server.get("/apis", {"Accept": AGGREGATED_ACCEPT})
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    assert answer.headers["vary"] == "Accept"
    document = answer.json()
    assert document["kind"] == "APIGroupDiscoveryList" and document["apiVersion"] == "apidiscovery.k8s.io/v2"
    (group,) = document["items"]
    assert group["metadata"]["name"] == "k8s.wujiuye.com"
    (version,) = group["versions"]
    assert version["version"] == "v1beta1" and version["freshness"] == "Current"
    (resource,) = version["resources"]
    assert resource["resource"] == "requests" and resource["singularResource"] == "request"
    assert resource["scope"] == "Namespaced" and resource["verbs"] == ["get", "list", "watch"]
    assert resource["responseKind"] == {"group": "k8s.wujiuye.com", "version": "v1beta1", "kind": "Requests"}


def test_aggregated_discovery_v2beta1_when_only_that_is_offered(server):
    answer = server.get("/apis", {"Accept": "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"})
    assert answer.headers["content-type"] == "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
    assert answer.json()["apiVersion"] == "apidiscovery.k8s.io/v2beta1"
    # kube-apiserver 1.30–1.36 offers both: v2 wins.
    both = server.get("/apis", {"Accept": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                                          "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"})
    assert both.json()["apiVersion"] == "apidiscovery.k8s.io/v2"


def test_aggregated_only_accept_that_we_cannot_meet_is_406(server):
    # Old kube-apiservers fall back to legacy discovery (APIGroupList) only on a 406, not on other errors.
    assert_status(server.get("/apis", {"Accept": "application/json;g=apidiscovery.k8s.io;v=v3;as=APIGroupDiscoveryList"}),
                  406, "NotAcceptable")


def test_legacy_discovery(server):
    groups = server.get("/apis", {"Accept": "application/json"}).json()
    assert groups == {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "k8s.wujiuye.com",
        "versions": [{"groupVersion": "k8s.wujiuye.com/v1beta1", "version": "v1beta1"}],
        "preferredVersion": {"groupVersion": "k8s.wujiuye.com/v1beta1", "version": "v1beta1"}}]}
    group = server.get("/apis/k8s.wujiuye.com").json()
    assert group["kind"] == "APIGroup" and group["name"] == "k8s.wujiuye.com"
    resources = server.get(GV).json()
    assert resources["kind"] == "APIResourceList" and resources["apiVersion"] == "v1"
    assert resources["groupVersion"] == "k8s.wujiuye.com/v1beta1"
    (resource,) = resources["resources"]
    assert resource == {"name": "requests", "singularName": "request", "namespaced": True, "kind": "Requests",
                        "verbs": ["get", "list", "watch"], "shortNames": ["req"], "categories": ["wujiuye"]}


@pytest.mark.parametrize("path,accept", [("/apis", AGGREGATED_ACCEPT), ("/apis", "application/json"),
                                         ("/apis/k8s.wujiuye.com", ""), (GV, ""), ("/openapi/v3", ""),
                                         ("/openapi/v2", ""), (f"/openapi/v3{GV}", "")])
def test_discovery_etag_and_304(server, path, accept):
    headers = {"Accept": accept} if accept else {}
    first = server.get(path, headers)
    etag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9A-F]{128}"', etag)
    again = server.get(path, {**headers, "If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    assert server.get(path, {**headers, "If-None-Match": '"other"'}).status == 200


def test_discovery_variants_have_different_etags(server):
    v2 = server.get("/apis", {"Accept": AGGREGATED_ACCEPT}).headers["etag"]
    legacy = server.get("/apis", {"Accept": "application/json"}).headers["etag"]
    assert v2 != legacy


# OpenAPI

def test_openapi_v3_root_lists_only_our_group_version(server):
    root = server.get("/openapi/v3").json()
    assert list(root["paths"]) == ["apis/k8s.wujiuye.com/v1beta1"]
    url = root["paths"]["apis/k8s.wujiuye.com/v1beta1"]["serverRelativeURL"]
    document = server.get(url)
    assert document.status == 200 and document.headers["cache-control"] == "public, immutable"
    assert "expires" in document.headers


def test_openapi_v3_document_finds_the_kind_like_kubectl_explain(server):
    document = server.get(f"/openapi/v3{GV}?hash=stale").json()      # a stale hash still gets the document
    gvk = {"group": "k8s.wujiuye.com", "version": "v1beta1", "kind": "Requests"}
    operation = document["paths"][f"{GV}/namespaces/{{namespace}}/requests/{{name}}"]["get"]
    assert operation["x-kubernetes-group-version-kind"] == gvk
    schemas = document["components"]["schemas"]
    owners = [name for name, schema in schemas.items() if gvk in schema.get("x-kubernetes-group-version-kind", [])]
    assert owners == ["com.wujiuye.k8s.v1beta1.Requests"]
    for text in json.dumps(document).split('"$ref": "')[1:]:
        assert text.split('"')[0].removeprefix("#/components/schemas/") in schemas


def test_openapi_v2_is_swagger_with_the_same_types(server):
    document = server.get("/openapi/v2", {"Accept": "application/json"}).json()
    assert document["swagger"] == "2.0"
    assert "com.wujiuye.k8s.v1beta1.Requests" in document["definitions"]
    assert all(path.startswith(f"{GV}/") for path in document["paths"])


def test_openapi_never_redirects(server):
    for path in ("/openapi/v3", f"/openapi/v3{GV}?hash=0", "/openapi/v2"):
        assert server.get(path).status == 200


# Version, root, health and metrics

def test_version_is_this_servers_own(server):
    import reqapi
    version = server.get("/version").json()
    assert version["gitVersion"] == f"v{reqapi.__version__}"
    assert (version["major"], version["minor"]) == tuple(reqapi.__version__.split(".")[:2])


def test_root_lists_paths(server):
    assert "/apis" in server.get("/").json()["paths"]


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz"])
def test_health(server, path):
    answer = server.get(path)
    assert (answer.status, answer.body) == (200, b"ok")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    verbose = server.get(f"{path}?verbose").text
    assert "[+]ping ok" in verbose and verbose.rstrip().endswith(f"{path[1:]} check passed")
    assert server.get(f"{path}/ping").body == b"ok"
    assert server.get(f"{path}/nope").status == 404


def test_readyz_verbose_lists_checks_and_warns_that_authentication_is_off(server):
    text = server.get("/readyz?verbose").text
    for check in ("ping", "rules", "authentication", "shutdown"):
        assert f"[+]{check} ok" in text
    assert "authentication is off" in text
    assert "excluded: ok" in server.get("/readyz?verbose&exclude=ping").text


def test_metrics_in_prometheus_format_without_names(server):
    server.get(OBJECT)
    server.get(f"{GV}/namespaces/default/requests/Bad")
    text = server.get("/metrics").text
    assert re.search(r'reqapi_requests_total\{verb="GET",resource="requests",code="200"\} [1-9]', text)
    assert re.search(r'reqapi_requests_total\{verb="GET",resource="requests",code="400"\} [1-9]', text)
    assert 'reqapi_request_duration_seconds_bucket{verb="GET",le="+Inf"}' in text
    for metric in ("reqapi_requests_in_flight", "reqapi_watches_open", "reqapi_connections_open",
                   "reqapi_serving_certificate_expiry_timestamp_seconds"):
        assert re.search(rf"^{metric} \d", text, re.M), metric
    assert "web" not in text and "default" not in text.replace("# HELP", "")


def test_request_log_line(server):
    server.get(f"{GV}/namespaces/default/requests/logged-one", {"Audit-Id": "abc-123"})
    line = server.wait_for_log(r".*GET /apis/k8s.wujiuye.com/v1beta1/namespaces/default/requests/logged-one.*")
    assert re.search(r" 200 \d+\.\d+ms user=system:anonymous auth=none remote=127\.0\.0\.1:\d+ audit_id=abc-123",
                     line.group(0)), line.group(0)


class RecordCountingClient:
    """A TLS client over a plain socket and memory BIOs, so that it sees the TLS records the server
    sends: a response written with one sendall arrives in one application-data record (it is far
    below the 16 KiB record limit), a head and a body written apart arrive in two."""

    def __init__(self, server, certs):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = certs.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2      # no TLS 1.3 session tickets among the records
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.raw = b""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.raw += chunk
        self.incoming.write(chunk)

    def get(self, path: str, headers: str = "") -> tuple[bytes, int]:
        """The response to one GET (with a Content-Length body), and how many TLS records carried it."""
        self.raw = b""
        self.tls.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
        self._flush()
        response = b""
        while True:
            try:
                response += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._receive()
                continue
            head, _, body = response.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            if length and len(body) >= int(length.group(1)):
                return response, self._records()

    def _records(self) -> int:
        count, position = 0, 0
        while position + 5 <= len(self.raw):
            kind, size = self.raw[position], int.from_bytes(self.raw[position + 3:position + 5], "big")
            count += kind == 23            # application data
            position += 5 + size
        return count

    def close(self) -> None:
        self.sock.close()


def test_responses_are_single_writes_with_keep_alive(server, certs):
    client = RecordCountingClient(server, certs)
    try:
        for _ in range(3):
            response, records = client.get(OBJECT)
            assert response.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection:" not in response
            assert records == 1, f"the response came in {records} TLS records: it was written in pieces"
        response, records = client.get("/readyz?verbose", "")
        assert response.startswith(b"HTTP/1.1 200 ") and records == 1, (records, response[:200])
        response, records = client.get(OBJECT, "Connection: close\r\n")
        assert b"\r\nConnection: close\r\n" in response and records == 1
    finally:
        client.close()


def test_tls_1_1_clients_are_refused_and_alpn_is_http11(server, certs):
    context = certs.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
    assert reqapi.build_tls_context(str(certs.cert_file), str(certs.key_file),
                                    reqapi.AuthConfig()).minimum_version == ssl.TLSVersion.TLSv1_2

    def tls11_client() -> ssl.SSLContext:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")   # OpenSSL 3 refuses TLS 1.1 at the default level
        return old

    # The control: the same client against a server that allows TLS 1.0.  Without it, a client
    # that cannot speak TLS 1.1 at all (OpenSSL 3 builds may not) would "prove" the refusal.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(str(certs.cert_file), str(certs.key_file))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept_one() -> None:
            conn, _ = listener.accept()
            try:
                with permissive.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
        threading.Thread(target=accept_one, daemon=True).start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with tls11_client().wrap_socket(raw) as tls:
                    assert tls.version() == "TLSv1.1"
        except ssl.SSLError as error:
            pytest.skip(f"this Python's OpenSSL cannot speak TLS 1.1 even to a server that allows it ({error}): "
                        f"the refusal cannot be shown over the network here")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            tls11_client().wrap_socket(raw)
    assert server.get(OBJECT).status == 200


def test_silent_client_does_not_delay_others(server):
    with socket.create_connection(("127.0.0.1", server.port)):
        started = time.perf_counter()
        assert server.get(OBJECT).status == 200
        assert time.perf_counter() - started < 2.0


def test_head_of_a_watch_leaves_the_connection_usable(server):
    connection = server.connection()
    connection.request("HEAD", f"{GV}/requests?watch=true&timeoutSeconds=1")
    response = connection.getresponse()
    assert response.status == 200 and response.read() == b""
    connection.request("GET", OBJECT)
    assert connection.getresponse().status == 200
    connection.close()


# ---------------------------------------------------------------------------------------
# The response memos (issue 12, item 4): keyed by what decides an answer's bytes, bounded by
# bytes.  In process with the clock held on one second, counted with tracemalloc; then floods
# against a real server, whose RSS a second wave must leave where the first left it.
# ---------------------------------------------------------------------------------------

import os          # noqa: E402

from test_floods import FLAT, MiB, probes_answer, two_waves  # noqa: E402
from test_storage import allocated_by, many_named  # noqa: E402


def in_process_api(document: dict, monkeypatch) -> reqapi.Api:
    history = reqapi.RulesHistory(reqapi.parse_rules(document, "rules.json"))
    access, metrics = reqapi.Access(reqapi.AlwaysAllow()), reqapi.Metrics()
    log = reqapi.Logger(fd=os.open(os.devnull, os.O_WRONLY))
    monkeypatch.setattr(reqapi.time, "time", lambda: 1_800_000_000.0)     # one second for every answer
    return reqapi.Api(reqapi.RequestsStorage(history), access, reqapi.Health(history, access, metrics), metrics,
                      log, 300)


def list_of(api: reqapi.Api, query: str, accept: str = "") -> reqapi.Response:
    head = f"GET {GV}/namespaces/load/requests?{query} HTTP/1.1\r\nHost: a" + (f"\r\nAccept: {accept}" if accept else "")
    request = reqapi.parse_head(head.encode())   # a head without its final blank line
    request.params = {"namespace": "load"}
    return api.list_response(reqapi.list_options(request))


def test_lists_that_select_the_same_page_are_one_memo_entry(monkeypatch):
    api = in_process_api(many_named(50, "1"), monkeypatch)
    first = list_of(api, "")
    # Junk selectors that select every item, a limit above their number, an Accept header with
    # parameters that do not change the representation: the same answer, built once.
    for query in ("labelSelector=junk!=1", "labelSelector=junk!=2", "fieldSelector=metadata.name!=nope",
                  "limit=500", "limit=1000&labelSelector=a!=b", "junk=" + "x" * 4000):
        assert list_of(api, query) is first, query
    assert list_of(api, "", accept="application/json;q=0.9, text/html;q=0.1") is first
    # What does change the answer gets its own: another page, another representation.
    assert list_of(api, "limit=10").body != first.body
    assert list_of(api, "", accept="application/json;as=Table;v=v1;g=meta.k8s.io").body != first.body


def test_the_list_memo_is_bounded_by_bytes(monkeypatch):
    # 1,020 lists with junk query strings reached 713 MB when the memo was bounded by entries.
    api = in_process_api(many_named(2000, "1"), monkeypatch)
    size = len(list_of(api, "").body)

    def distinct_pages():
        for index in range(40):                # each leaves out another item: 40 different answers
            assert len(list_of(api, f"fieldSelector=metadata.name!=w-{index:04d}").body) < size
    kept = allocated_by(distinct_pages)
    print(f"40 lists of {size / MiB:.2f} MiB: the memo kept {kept / MiB:.1f} MiB")
    assert kept <= 8 * MiB + MiB // 2, kept / MiB             # LIST_MEMO_BYTES
    assert reqapi.Api.LIST_MEMO_BYTES == 8 * MiB


def test_the_object_memo_is_bounded_by_bytes(monkeypatch):
    api = in_process_api(many_named(10, "1"), monkeypatch)

    def distinct_names():
        for index in range(30_000):            # ~24 MB of answers (and ~13 MB of predictions) asked for
            assert api.object_json("prod-eu", f"w{index}-" + "x" * 240)
    kept = allocated_by(distinct_names)
    print(f"30,000 distinct 250-character names: the memos kept {kept / MiB:.1f} MiB")
    assert kept <= 4 * MiB + 4 * MiB + MiB // 2, kept / MiB   # OBJECT_MEMO_BYTES + PREDICTION_MEMO_BYTES
    assert reqapi.Api.OBJECT_MEMO_BYTES == 4 * MiB


def test_a_memo_entry_costs_no_more_than_counted(monkeypatch):
    api = in_process_api(many_named(2000, "1"), monkeypatch)
    list_of(api, "limit=1")                    # the storage's selection of the namespace, memoised once
    counted = []

    def lists():
        for index in range(20):
            body = list_of(api, f"limit={100 + index}").body
            token = json.loads(body)["metadata"]["continue"]
            counted.append(len(body) + reqapi.Api.LIST_ENTRY_BYTES + 8 * (100 + index) + len(token))
    kept = allocated_by(lists)
    assert kept <= sum(counted), (kept, sum(counted))
    api = in_process_api(many_named(10, "1"), monkeypatch)
    names = [f"w{index}-" + "x" * 100 for index in range(2000)]

    def objects():
        for name in names:
            api.object_json("prod-eu", name)
    kept = allocated_by(objects)
    body = len(api.object_json("prod-eu", names[0]))
    counted = len(names) * (body + reqapi.Api.OBJECT_ENTRY_BYTES + len("prod-eu") + len(names[0])
                            + reqapi.PREDICTION_ENTRY_BYTES + len("prod-eu") + len(names[0]))
    assert kept <= counted, (kept / len(names), counted / len(names))


def test_a_flood_of_distinct_long_names_leaves_rss_flat(start_server):
    server = start_server()
    waves = iter(range(2))

    def wave() -> list:
        first = next(waves) * 15_000           # every name new: the second wave asks others
        connection = server.connection()
        try:
            for index in range(first, first + 15_000):   # ~450 bytes of prediction memo, ~900 of object memo
                connection.request("GET", f"{GV}/namespaces/prod-eu/requests/w{index}-" + "x" * 240)
                response = connection.getresponse()
                assert response.status == 200 and response.read()
        finally:
            connection.close()
        return []

    first, second = two_waves(server, wave)
    assert second - first < FLAT


def test_a_flood_of_lists_with_junk_query_strings_leaves_rss_flat(start_server, tmp_path):
    rules = write_rules(tmp_path / "rules.json", many_named(500, "1"))
    server = start_server("--rules", str(rules))
    waves = iter(range(2))

    def wave() -> list:
        first = next(waves) * 200
        connection = server.connection()
        try:
            for index in range(first, first + 200):   # each a ~200 KB list of all 500, under another junk selector
                connection.request("GET", f"{GV}/namespaces/load/requests?labelSelector=junk!=x{index}"
                                          f"&fieldSelector=metadata.name!=junk-{index}")
                response = connection.getresponse()
                assert response.status == 200 and len(response.read()) > 100_000
        finally:
            connection.close()
        return []

    first, second = two_waves(server, wave)
    assert second - first < FLAT
