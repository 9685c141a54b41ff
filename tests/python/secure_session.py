"""A client's view of a cluster with passwords, a cluster secret and maybe TLS.

Usage: secure_session.py BALANCER_PORT NODE_PORT SCHEME CAFILE USER PASSWORD_FILE

SCHEME is http or https; CAFILE is the CA to trust for https ("-" for none). Exits non-zero,
saying why, at the first thing that is not as docs/protocol.md's Security section says.
"""

import http.client
import base64
import ssl
import sys
import xmlrpc.client

balancer_port, node_port, scheme, cafile, user, password_file = sys.argv[1:7]
with open(password_file) as f:
    password = f.readline().strip()
context = ssl.create_default_context(cafile=cafile) if scheme == "https" else None


def proxy(port, credentials=True, context=context):
    auth = f"{user}:{password}@" if credentials else ""
    url = f"{scheme}://{auth}127.0.0.1:{port}"
    if scheme == "https":
        return xmlrpc.client.ServerProxy(url, context=context)
    return xmlrpc.client.ServerProxy(url)


def raw(port, method, path, headers=None, body=None):
    """One request on a fresh connection: (status, headers, body)."""
    if scheme == "https":
        conn = http.client.HTTPSConnection("127.0.0.1", int(port), context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    result = (response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace"))
    conn.close()
    return result


def expect(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

# The README session, with credentials in the URL and no other code.
lb = proxy(balancer_port)
expect(lb.put("john", "novatnack") == "200", "put with credentials answers '200'")
expect(lb.get("john") == "novatnack", "get with credentials reads it back")
expect(lb.delete("john") == "200", "delete with credentials")

# No credentials, or wrong ones: HTTP 401 with the realm, before anything is read.
for name, credentials in [("no", None), ("wrong", "Basic " + base64.b64encode(f"{user}:nope".encode()).decode())]:
    headers = {"Content-Type": "text/xml"}
    if credentials:
        headers["Authorization"] = credentials
    body = xmlrpc.client.dumps(("john",), "get")
    status, answer_headers, _ = raw(balancer_port, "POST", "/RPC2", headers, body)
    challenge = {k.lower(): v for k, v in answer_headers.items()}.get("www-authenticate")
    expect(status == 401, f"{name} credentials: HTTP 401 (got {status})")
    expect(challenge == 'Basic realm="dynamite"', f"{name} credentials: WWW-Authenticate names the realm ({challenge!r})")
try:
    proxy(balancer_port, credentials=False).get("john")
    expect(False, "ServerProxy without credentials is refused")
except xmlrpc.client.ProtocolError as error:
    expect(error.errcode == 401, "ServerProxy without credentials gets ProtocolError 401")

# /health stays open for probes; /metrics needs the password, and counts the refusals.
for port in (balancer_port, node_port):
    status, _, body = raw(port, "GET", "/health")
    expect(status == 200, f"/health on {port} open without credentials")
    status, _, _ = raw(port, "GET", "/metrics")
    expect(status == 401, f"/metrics on {port} needs credentials")
status, _, metrics = raw(balancer_port, "GET", "/metrics", {"Authorization": basic})
expect(status == 200, "/metrics with credentials")
line = [l for l in metrics.splitlines() if l.startswith('dynamite_auth_failures_total{kind="wrong_password"}')]
expect(line and int(line[0].split()[-1]) >= 1, f"/metrics counts the wrong password ({line})")

# The client's password does not open the cluster's internal methods.
for port, method in [(balancer_port, "cluster.layout"), (node_port, "local.get"), (node_port, "cluster.stage_remove")]:
    args = () if method == "cluster.layout" else ("127.0.0.1:1",)
    try:
        getattr(proxy(port), method)(*args)
        expect(False, f"{method} with a client's password is refused")
    except xmlrpc.client.Fault as fault:
        expect(fault.faultCode == 403, f"{method} with a client's password: fault 403 ({fault.faultString})")
# Nor inside a multicall.
multi = xmlrpc.client.MultiCall(proxy(node_port))
multi.get("john")
getattr(multi, "local.put")("john", "forged")
results = multi()
try:
    list(results)
    expect(False, "local.put inside a multicall is refused")
except xmlrpc.client.Fault as fault:
    expect(fault.faultCode == 403, "local.put inside a multicall: fault 403")
status, _, _ = raw(node_port, "POST", "/internal/batch", {"Authorization": basic, "Content-Type": "application/octet-stream"}, b"\x00")
expect(status == 403, f"a client's password does not open /internal/batch (HTTP {status})")
status, _, _ = raw(node_port, "POST", "/internal/batch", {"dynamite-cluster-secret": "not-the-secret-at-all", "Content-Type": "application/octet-stream"}, b"\x00")
expect(status == 403, f"a wrong cluster secret is refused (HTTP {status})")

# Stats and faults carry no secret.
stats = repr(lb.stats())
expect(password not in stats, "stats() does not carry the password")

if scheme == "https":
    # A client that does not trust the cluster's CA is refused at the handshake.
    try:
        proxy(balancer_port, context=ssl.create_default_context()).get("john")
        expect(False, "a client that does not trust the CA is refused")
    except ssl.SSLCertVerificationError:
        expect(True, "a client that does not trust the CA is refused (certificate verify failed)")
    # Plain HTTP to an HTTPS port gets nothing.
    try:
        xmlrpc.client.ServerProxy(f"http://{user}:{password}@127.0.0.1:{balancer_port}").get("john")
        expect(False, "plain HTTP to the HTTPS port gets no answer")
    except (xmlrpc.client.ProtocolError, ConnectionError, http.client.HTTPException, OSError):
        expect(True, "plain HTTP to the HTTPS port gets no answer")

print("secure session: all ok")
