#!/usr/bin/env python3
"""Start Debian's Orthanc configured the way the orthancteam/orthanc image configures itself.

The JSON files in /etc/orthanc (sorted by name; a later file's top-level keys win) are merged with the
environment: ORTHANC__STABLE_AGE=5 sets "StableAge": 5, ORTHANC__DICOM_WEB__ENABLE=true sets
"DicomWeb": {"Enable": true} (each word capitalised; values are read as JSON when they parse, else as
strings). <NAME>_PLUGIN_ENABLED=true loads a plugin, as does the plugin's own section in the
configuration; =false keeps it out. The result is written to /tmp/orthanc.json (readable by this user
only: it holds the registered users' passwords), which /probes/test-aliveness.py reads too.
"""
import glob
import json
import os
import sys

CONFIG_DIR = "/etc/orthanc"
MERGED = "/tmp/orthanc.json"
PLUGIN_DIR = "/usr/share/orthanc/plugins"
#: env prefix -> (shared library, configuration section that also enables it)
PLUGINS = {"DICOM_WEB": ("libOrthancDicomWeb.so", "DicomWeb")}


def camel(word: str) -> str:
    return "".join(part[:1].upper() + part[1:].lower() for part in word.split("_"))


def value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    config: dict = {}
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                config.update(json.load(f))
            except ValueError as e:
                sys.exit(f"orthanc-start: {path} is not JSON: {e}")
    for name, text in sorted(os.environ.items()):
        if name.startswith("ORTHANC__") and len(name) > 9:
            keys = [camel(k) for k in name[9:].split("__")]
            node = config
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = value(text)
    plugins = list(config.get("Plugins", []))
    for prefix, (library, section) in PLUGINS.items():
        flag = os.environ.get(f"{prefix}_PLUGIN_ENABLED", "").lower()
        if flag == "true" or (flag != "false" and section in config):
            path = os.path.join(PLUGIN_DIR, library)
            if path not in plugins:
                plugins.append(path)
            if flag == "true":
                config.setdefault(section, {}).setdefault("Enable", True)
    config["Plugins"] = plugins
    fd = os.open(MERGED, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    os.execv("/usr/sbin/Orthanc", ["Orthanc", *sys.argv[1:], MERGED])


if __name__ == "__main__":
    main()
