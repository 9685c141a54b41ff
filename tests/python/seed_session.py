#!/usr/bin/env python3
"""The README session, from Python's standard-library XML-RPC client.

Usage: seed_session.py BALANCER_PORT [NODE_PORT...]

Talks to a running Dynamite cluster on 127.0.0.1 with nothing but ``xmlrpc.client``, as any
user would, and checks what docs/protocol.md promises a conforming client: the seed session,
every XML-RPC type round-tripped, nil for missing keys, versions and contexts, faults with
their codes, and system.multicall. Exits non-zero on the first broken promise.
"""

import sys
import xmlrpc.client
from xmlrpc.client import Binary, DateTime, Fault, MultiCall, ServerProxy


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def expect_fault(code, call, *args):
    try:
        result = call(*args)
    except Fault as fault:
        check(
            fault.faultCode == code,
            f"expected fault {code}, got {fault.faultCode}: {fault.faultString!r}",
        )
        return fault
    raise AssertionError(f"expected fault {code}, got the value {result!r}")


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    balancer_port = int(argv[1])
    node_ports = [int(port) for port in argv[2:]]

    # /RPC2 is the path xmlrpc-c and others default to; the balancer serves it like /.
    p = ServerProxy(f"http://127.0.0.1:{balancer_port}/RPC2", allow_none=True)

    # The README session.
    check(p.put("john", "novatnack") == "200", "put('john', 'novatnack') != '200'")
    got = p.get("john")
    check(got == "novatnack", f"get('john') returned {got!r}")
    print("seed session: put/get john OK")

    # Each storage node answers local.get() with its own copy, and stats() with counts.
    holders = 0
    for port in node_ports:
        node = ServerProxy(f"http://127.0.0.1:{port}/", allow_none=True)
        local = getattr(node, "local.get")("john")
        check(local in ("novatnack", None), f"node {port} holds {local!r} for john")
        holders += local == "novatnack"
        stats = node.stats()
        check(isinstance(stats.get("keys"), int), f"node {port} stats keys: {stats!r}")
        check(isinstance(stats.get("hints"), int), f"node {port} stats hints: {stats!r}")
    if node_ports:
        check(holders >= 2, f"only {holders} nodes hold john after a W=2 put")
        print(f"local copies: {holders} of {len(node_ports)} nodes hold john")

    # Python's types, round-tripped exactly.
    values = {
        "str": "novatnack",
        "empty str": "",
        "unicode str": "héllo wörld ✓ 日本語 🦀",
        "xml special str": "<&>\"' </value>",
        "whitespace str": "  padded \n\ttext \n",
        "int": 42,
        "negative int": -(2**31),
        "max int": 2**31 - 1,
        "true": True,
        "false": False,
        "float": 3.14159,
        "negative float": -2.5e-3,
        "large float": 1e300,
        "tiny float": 1e-300,
        "bytes": Binary(bytes(range(256))),
        "empty bytes": Binary(b""),
        "datetime": DateTime("20070101T12:34:56"),
        "list": [1, "two", 3.0, False],
        "empty list": [],
        "dict": {"name": "john", "age": 30},
        "empty dict": {},
        "nested": {
            "list": [{"deep": [1, [2, [3, {"deeper": Binary(b"\x00\xff")}]]]}],
            "when": DateTime("19700101T00:00:00"),
            "none inside": "not a nil",
        },
    }
    for name, value in values.items():
        key = f"py-{name}"
        check(p.put(key, value) == "200", f"put of {name} did not answer '200'")
        got = p.get(key)
        check(type(got) is type(value), f"{name}: got type {type(got).__name__}, {got!r}")
        check(got == value, f"{name}: stored {value!r}, got back {got!r}")
    print(f"round trip: {len(values)} values of Python types OK")

    # A key nobody wrote.
    check(p.get("py-never-written") is None, "get of a missing key is not None")
    versions = p.get_versions("py-never-written")
    check(versions == {"values": [], "context": ""}, f"missing key versions: {versions!r}")

    # Versions and contexts.
    versions = p.get_versions("john")
    check(isinstance(versions, dict), f"get_versions returned {versions!r}")
    check("values" in versions and "context" in versions, f"get_versions: {versions!r}")
    check(versions["values"] == ["novatnack"], f"john's versions: {versions['values']!r}")
    check(isinstance(versions["context"], str) and versions["context"], "empty context")
    check(p.put("john", "smith", versions["context"]) == "200", "put with a context")
    check(p.get("john") == "smith", "put with a context did not replace the value")
    versions = p.get_versions("john")
    check(versions["values"] == ["smith"], f"versions after put with context: {versions!r}")
    check(p.delete("john", versions["context"]) == "200", "delete with a context")
    check(p.get("john") is None, "john still readable after delete")
    check(p.put("doe", "jane") == "200", "put doe")
    check(p.delete("doe") == "200", "delete without a context")
    check(p.get("doe") is None, "doe still readable after delete")
    print("versions, contexts and deletes OK")

    # Faults carry their codes.
    expect_fault(-32602, p.put, "only-a-key")
    expect_fault(-32602, p.put, "k", None)
    expect_fault(-32602, p.put, 42, "int key")
    expect_fault(-32602, p.get, "k" * 65537)
    expect_fault(-32601, p.no_such_method, "k")
    print("faults OK")

    # system.* methods.
    methods = p.system.listMethods()
    for method in ("put", "get", "delete"):
        check(method in methods, f"system.listMethods lacks {method}: {methods!r}")
    multi = MultiCall(p)
    multi.put("py-multi", "value")
    multi.get("py-multi")
    multi.put("only-a-key")
    multi.get("py-never-written")
    results = multi()
    check(results[0] == "200", f"multicall put: {results[0]!r}")
    check(results[1] == "value", f"multicall get: {results[1]!r}")
    try:
        bad = results[2]
    except Fault as fault:
        check(fault.faultCode == -32602, f"multicall fault code {fault.faultCode}")
    else:
        raise AssertionError(f"a bad call inside multicall returned {bad!r}")
    check(results[3] is None, f"multicall get of a missing key: {results[3]!r}")
    print("system.listMethods and system.multicall OK")

    print("python client: all OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
