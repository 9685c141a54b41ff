#!/usr/bin/env python3
"""Deeply nested values from Python's standard-library XML-RPC client.

Usage: deep_values.py BALANCER_PORT [NODE_PORT...]

docs/protocol.md: a value is any XML-RPC value but nil, "nested to any depth the size limit allows",
and get returns exactly what was stored. Python's marshaller recurses (it stops near 500
levels), so the values here stay below that: 64 and 300 levels of arrays and structs mixed,
with a leaf of every type at each level, put through the balancer, read back through it and
from the storage nodes' own copies, in a plain put and in a system.multicall. Exits non-zero
on the first broken promise.
"""

import sys
from xmlrpc.client import Binary, DateTime, MultiCall, ServerProxy

DEPTHS = (64, 300)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def nested(depth):
    """Arrays and structs alternating, `depth` levels deep, leaves of every type on the way."""
    value = ["bottom <&>", 7, True, 0.1, Binary(b"\x00\xff"), DateTime("20070101T12:34:56")]
    for level in range(depth):
        if level % 2 == 0:
            # Members out of name order, and a nil inside (allowed below the top).
            value = {"z inner": value, "a level": level, "m none": None}
        else:
            value = [value, f"level {level} & <more>", -level * 1.5]
    return value


def depth_of(value):
    """Levels of arrays and structs, counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    balancer = ServerProxy(f"http://127.0.0.1:{argv[1]}/", allow_none=True)
    nodes = [ServerProxy(f"http://127.0.0.1:{port}/", allow_none=True) for port in argv[2:]]

    for depth in DEPTHS:
        value = nested(depth)
        check(depth_of(value) == depth + 1, f"the test value is {depth_of(value)} deep")
        key = f"deep-{depth}"
        check(balancer.put(key, value) == "200", f"put of {depth} levels did not answer '200'")
        got = balancer.get(key)
        check(got == value, f"{depth} levels: get returned something else")
        versions = balancer.get_versions(key)
        check(versions["values"] == [value], f"{depth} levels: get_versions differs")
        holders = 0
        for node in nodes:
            local = getattr(node, "local.get")(key)
            check(local in (value, None), f"{depth} levels: a node holds something else")
            holders += local == value
        check(not nodes or holders >= 2, f"{depth} levels: only {holders} nodes hold it")
        print(f"{depth} levels: put, get, get_versions and {holders} local copies OK")

    multi = MultiCall(balancer)
    value = nested(DEPTHS[-1])
    multi.put("deep-multicall", value)
    multi.get("deep-multicall")
    results = multi()
    check(results[0] == "200", f"multicall put: {results[0]!r}")
    check(results[1] == value, "multicall get returned something else")
    check(balancer.get("deep-multicall") == value, "get after the multicall put")
    print(f"{DEPTHS[-1]} levels in system.multicall OK")

    print("deep values: all OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
