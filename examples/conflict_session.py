#!/usr/bin/env python3
"""Versions, a conflict and its resolution, step by step.

Start a cluster in another terminal (examples/local_cluster.sh), then run:

    python3 examples/conflict_session.py [BALANCER_URL [NODE_URL]]

BALANCER_URL defaults to http://localhost:30000 and NODE_URL to http://localhost:20050: the
balancer and the first storage node of local_cluster.sh. Two clients, Alice and Bob, edit
the same shopping cart (the example of the Dynamo paper): Alice through the balancer, Bob
through the storage node, since any node takes client calls. Each step prints what the
store answered and checks it: the script exits non-zero if the store does not behave as it
says.
"""

import sys
import uuid
import xmlrpc.client


def check(condition, claim):
    """Stops the session, non-zero, when the store does not do what we just said."""
    if not condition:
        sys.exit(f"\nUNEXPECTED: {claim}")


def main(argv):
    balancer_url = argv[1] if len(argv) > 1 else "http://localhost:30000"
    node_url = argv[2] if len(argv) > 2 else "http://localhost:20050"
    # allow_none: `get` answers nil (None) for a key that has no value.
    alice = xmlrpc.client.ServerProxy(balancer_url, allow_none=True)
    bob = xmlrpc.client.ServerProxy(node_url, allow_none=True)
    cart = f"cart:{uuid.uuid4().hex[:8]}"  # a fresh key, so the session can run again

    print(f"1. Alice creates {cart} with put(key, value), no context, via {balancer_url}")
    check(alice.put(cart, ["milk"]) == "200", "put did not answer '200'")
    print(f"   put({cart!r}, ['milk']) -> '200'")

    print("\n2. get_versions(key) answers every version of the key, and a context")
    versions = alice.get_versions(cart)
    print(f"   values:  {versions['values']}")
    print(f"   context: {versions['context']!r}")
    print("   (the context is opaque: it names the versions you have seen; hand it back)")
    check(versions["values"] == [["milk"]], "a new key should have exactly one version")

    print("\n3. Alice and Bob each read the cart: same version, same context")
    alice_context = alice.get_versions(cart)["context"]
    bob_read = bob.get_versions(cart)
    bob_context = bob_read["context"]
    print(f"   Bob, via {node_url}: {bob_read['values']}")
    check(bob_read["values"] == [["milk"]], "Bob should read the version Alice wrote")
    check(alice_context == bob_context, "two reads of the same version give one context")

    print("\n4. Each adds an item and writes the cart back with the context they read")
    check(alice.put(cart, ["milk", "eggs"], alice_context) == "200", "Alice's put failed")
    print("   Alice: put(key, ['milk', 'eggs'], context) -> '200'")
    check(bob.put(cart, ["milk", "bread"], bob_context) == "200", "Bob's put failed")
    print("   Bob:   put(key, ['milk', 'bread'], context) -> '200'")
    # Alice's write finished before Bob's started, yet they are concurrent: Bob's context
    # does not cover Alice's write (he never saw it), so his write cannot replace hers.
    # The store keeps both, as siblings. The context makes the conflict, not the timing
    # nor the entry point: Bob's put through the balancer would have done the same. Had Bob
    # put without a context, his cart would have replaced Alice's: a put without a context
    # supersedes the versions that entered the cluster before it.

    print("\n5. A conflict: get answers one value, get_versions both siblings")
    latest = alice.get(cart)
    versions = alice.get_versions(cart)
    siblings = versions["values"]
    print(f"   get:          {latest}")
    print(f"   get_versions: {siblings}")
    check(len(siblings) == 2, f"expected two siblings, got {siblings}")
    check(
        sorted(siblings) == [["milk", "bread"], ["milk", "eggs"]],
        f"the siblings should be Alice's cart and Bob's, got {siblings}",
    )
    check(latest in siblings, "get should answer one of the siblings")
    # get picks the sibling whose write entered the cluster last; get_versions lists the
    # siblings latest first, so the two agree.
    check(latest == siblings[0], "get should answer the sibling get_versions lists first")
    bob_sees = bob.get_versions(cart)["values"]
    print(f"   Bob's node sees the same siblings: {bob_sees}")
    check(sorted(bob_sees) == sorted(siblings), "every entry point sees both siblings")

    print("\n6. Resolve: merge the siblings, put the merge with get_versions' context")
    # Merging is the application's business: for a cart, the union of the items.
    merged = sorted(set().union(*siblings))
    check(alice.put(cart, merged, versions["context"]) == "200", "the merge's put failed")
    print(f"   put(key, {merged}, context) -> '200'")
    # That context covers both siblings, so the merge supersedes them both. (A put
    # without a context supersedes only what its coordinator holds that entered before
    # it; the context says exactly what you merged.)

    print("\n7. One version left")
    versions = bob.get_versions(cart)
    print(f"   get_versions: {versions['values']}")
    check(versions["values"] == [merged], "the merge should be the only version")
    latest = alice.get(cart)
    print(f"   get:          {latest}")
    check(latest == merged, "get should answer the merge")

    print("\nConflict made, seen and resolved: every claim above checked.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except ConnectionRefusedError as error:
        sys.exit(f"\nNo cluster answers ({error}): start examples/local_cluster.sh first.")
