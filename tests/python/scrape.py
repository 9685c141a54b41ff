"""Reads a daemon's /metrics with the Prometheus project's own parser, and prints every
sample as JSON: {"name{label=value,...}": value}. Fails (non-zero, saying why) when the text
is not valid OpenMetrics, which is the point: the test trusts no parser of ours.

Usage: scrape.py URL [USER PASSWORD_FILE]
"""

import base64
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

url = sys.argv[1]
request = urllib.request.Request(url)
if len(sys.argv) > 3:
    with open(sys.argv[3]) as f:
        password = f.readline().strip()
    token = base64.b64encode(f"{sys.argv[2]}:{password}".encode()).decode()
    request.add_header("Authorization", "Basic " + token)
with urllib.request.urlopen(request, timeout=10) as response:
    content_type = response.headers.get("Content-Type", "")
    text = response.read().decode()
if not content_type.startswith("application/openmetrics-text"):
    sys.exit(f"unexpected content type {content_type!r}")

samples = {}
types = {}
for family in text_string_to_metric_families(text):
    types[family.name] = family.type
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}"] = sample.value
print(json.dumps({"samples": samples, "types": types}))
