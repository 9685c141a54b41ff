"""Keeps a page open in headless Chromium and answers questions about it, one JSON line in,
one JSON line out, over stdin and stdout, for tests/status_page.rs.

Usage: cdp.py CHROMIUM PROFILE_DIR URL [USER PASSWORD]

Chromium runs with a DevTools port of its own choosing (read from PROFILE_DIR), and this
script speaks the DevTools protocol to the page with the websocket-client module. With USER
and PASSWORD, it answers the page's HTTP Basic challenges as a person does in the browser's
prompt (Fetch.authRequired), so what the page then fetches carries them as it would.

Commands, one JSON object per line:
  {"eval": "JS expression"}       -> {"value": ...} or {"error": "..."} (promises awaited)
  {"screenshot": "path.png"}      -> {"ok": true}
  {"cdp": [method, params]}       -> {"value": the result} (e.g. Emulation.setEmulatedMedia)
Once stdin ends, Chromium is closed.
"""

import base64
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import websocket

chromium, profile, url = sys.argv[1:4]
credentials = sys.argv[4:6] if len(sys.argv) >= 6 else None



def die_with_this_script():
    """Chromium is killed should this script be (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


browser = subprocess.Popen(
    [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "--window-size=1280,760",
        "--remote-debugging-port=0",
        "--user-data-dir=" + profile,
        "about:blank",
    ],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=open(os.path.join(profile, "chromium.log"), "w"),
    preexec_fn=die_with_this_script,
)


def fail(message):
    print(json.dumps({"error": message}), flush=True)
    browser.kill()
    sys.exit(1)


# Chromium writes its port to DevToolsActivePort once it listens.
port_file = os.path.join(profile, "DevToolsActivePort")
deadline = time.time() + 30
while not (os.path.exists(port_file) and open(port_file).read().count("\n") >= 1):
    if time.time() > deadline or browser.poll() is not None:
        fail("chromium did not start: see " + os.path.join(profile, "chromium.log"))
    time.sleep(0.05)
port = int(open(port_file).read().split()[0])
with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
    targets = json.load(response)
page = next(t for t in targets if t["type"] == "page")
socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
socket.settimeout(None)  # the reader below waits for as long as the test runs

# A reader thread hands replies to whoever waits for them and answers the browser's
# questions (paused requests, password challenges) at once, whatever the test is doing.
replies, arrived = {}, threading.Condition()
next_id = [0]
send_lock = threading.Lock()


def send(method, params=None):
    with send_lock:
        next_id[0] += 1
        message_id = next_id[0]
        socket.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
    return message_id


def call(method, params=None, timeout=30):
    message_id = send(method, params)
    with arrived:
        if not arrived.wait_for(lambda: message_id in replies, timeout):
            raise TimeoutError(method)
        reply = replies.pop(message_id)
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply.get("result", {})


def read_forever():
    while True:
        try:
            message = json.loads(socket.recv())
        except Exception:
            return
        if "id" in message:
            with arrived:
                replies[message["id"]] = message
                arrived.notify_all()
        elif message.get("method") == "Fetch.requestPaused":
            send("Fetch.continueRequest", {"requestId": message["params"]["requestId"]})
        elif message.get("method") == "Fetch.authRequired":
            user, password = credentials
            send(
                "Fetch.continueWithAuth",
                {
                    "requestId": message["params"]["requestId"],
                    "authChallengeResponse": {
                        "response": "ProvideCredentials",
                        "username": user,
                        "password": password,
                    },
                },
            )


threading.Thread(target=read_forever, daemon=True).start()

call("Page.enable")
call("Runtime.enable")
if credentials:
    call("Fetch.enable", {"handleAuthRequests": True})
call("Page.navigate", {"url": url})

for line in sys.stdin:
    command = json.loads(line)
    try:
        if "eval" in command:
            result = call(
                "Runtime.evaluate",
                {"expression": command["eval"], "returnByValue": True, "awaitPromise": True},
            )
            if "exceptionDetails" in result:
                answer = {"error": result["exceptionDetails"].get("text", "exception")}
                thrown = result.get("result", {}).get("description")
                if thrown:
                    answer["error"] += ": " + thrown
            else:
                answer = {"value": result["result"].get("value")}
        elif "screenshot" in command:
            shot = call("Page.captureScreenshot", {"format": "png"})
            with open(command["screenshot"], "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            answer = {"ok": True}
        elif "cdp" in command:
            answer = {"value": call(*command["cdp"])}
        else:
            answer = {"error": "unknown command"}
    except Exception as error:
        answer = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(answer), flush=True)

try:
    call("Browser.close", timeout=5)
except Exception:
    pass
try:
    browser.wait(timeout=10)
except subprocess.TimeoutExpired:
    browser.kill()
