#!/usr/bin/env python3
"""Health check of the Debian Orthanc image (same path and exit codes as orthancteam/orthanc's probe).

Asks Orthanc's REST API for its last change (/changes?last: reads the database, unlike /system) as the
first registered user of /tmp/orthanc.json; exit status 0 when it answers 200, else 1 with the reason.
"""
import base64
import json
import sys
import urllib.request

try:
    with open("/tmp/orthanc.json", encoding="utf-8") as f:
        config = json.load(f)
    request = urllib.request.Request(f"http://127.0.0.1:{config.get('HttpPort', 8042)}/changes?last")
    users = config.get("RegisteredUsers") or {}
    if config.get("AuthenticationEnabled", True) and users:
        user, password = next(iter(users.items()))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as e:  # any failure is "not alive", with its reason (docker inspect shows it)
    print(f"orthanc not alive: {e}")
    sys.exit(1)
