#!/usr/bin/env bash
# Build the stack's three base images from Debian packages, for hosts that reach no container registry
# (an air-gapped PACS network) but do reach a Debian mirror: the one apt on this host uses.
#
#   bash deploy/images/build.sh            # builds (or reuses) the images, prints the settings for compose.yaml
#   eval "$(bash deploy/images/build.sh --env)"   # ... and sets them in this shell
#   bash deploy/images/build.sh --refresh  # a fresh debootstrap and no layer cache (monthly: security updates)
#
# Images (tag prefix HER2_IMAGE_PREFIX, default her2-local):
#   her2-local/debian:bookworm   debootstrap --variant=minbase + docker import (the base of the other three)
#   her2-local/python:3.11       Debian python3 (3.11) + venv: HER2_BASE_IMAGE, build arg BASE of deploy/Dockerfile
#   her2-local/orthanc:bookworm  Debian orthanc + orthanc-dicomweb, configured like orthancteam/orthanc: ORTHANC_IMAGE
#   her2-local/redis:bookworm    Debian redis-server: REDIS_IMAGE
# Idempotent: the Debian base is made once and the rest comes from Docker's layer cache (a few seconds on
# a second run). The mirror is read from the host's apt sources (HER2_DEBIAN_MIRROR overrides it; the
# image's own sources also get the host's bookworm-updates and bookworm-security entries). No secret and
# no CA certificate goes into these images: apt fetches from the mirror over plain HTTP with signed
# indices. pip (deploy/Dockerfile) is where extra CA certificates are needed: see docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")"

prefix="${HER2_IMAGE_PREFIX:-her2-local}"
suite="${HER2_DEBIAN_SUITE:-bookworm}"
refresh=0 env_only=0
for arg in "$@"; do
  case "$arg" in
    --refresh) refresh=1 ;;
    --env) env_only=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
say() { if [ "$env_only" = 1 ]; then echo "$*" >&2; else echo "$*"; fi; }
die() { echo "build.sh: $*" >&2; exit 1; }
command -v docker >/dev/null || die "no docker command (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (start dockerd)"

# "URI suite" for the suite, its -updates and its -security, from the host's apt sources (both formats).
apt_sources() {
  python3 - "$suite" <<'PY'
import glob, re, sys
suite = sys.argv[1]
wanted = {suite, suite + "-updates", suite + "-security"}
found = []
def add(uri, suites, comps):
    for s in suites:
        if s in wanted and "main" in comps and (uri, s) not in found:
            found.append((uri.rstrip("/"), s))
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(line) >= 4 and line[0] == "deb":
            add(line[1], [line[2]], line[3:])
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for para in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in para.splitlines():
            if ":" in line and not line.startswith((" ", "#")):
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0] != "no":
            for uri in fields.get("uris", []):
                add(uri, fields.get("suites", []), fields.get("components", []))
for uri, s in found:
    print(uri, s)
PY
}

base="$prefix/debian:$suite"
if [ "$refresh" = 1 ] || ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || die "no debootstrap (apt-get install debootstrap)"
  sources="$(apt_sources)"
  mirror="${HER2_DEBIAN_MIRROR:-$(awk -v s="$suite" '$2 == s {print $1; exit}' <<<"$sources")}"
  [ -n "$mirror" ] || die "no Debian mirror for $suite in the host's apt sources; set HER2_DEBIAN_MIRROR"
  rootfs="$(mktemp -d /tmp/her2-rootfs.XXXXXX)"
  trap 'umount -R "$rootfs/proc" "$rootfs/sys" 2>/dev/null || true; rm -rf "$rootfs"' EXIT
  say "debootstrap --variant=minbase $suite from $mirror ..."
  start=$SECONDS
  if ! debootstrap --variant=minbase --components=main "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; die "debootstrap of $suite from $mirror failed (log above)"
  fi
  rm -f "$rootfs.log"
  # What Debian's own container images do: no service starts inside a build, no recommends, no docs.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"; chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$rootfs/etc/apt/apt.conf.d/90her2-slim"
  printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n' \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/90her2-slim"
  # The image's apt sources: the host's (with its -updates and -security: apt-get upgrade in a derived image
  # sees security updates), or only HER2_DEBIAN_MIRROR when that is set (a local mirror).
  if [ -n "${HER2_DEBIAN_MIRROR:-}" ]; then echo "deb $HER2_DEBIAN_MIRROR $suite main"
  else awk '{print "deb " $1 " " $2 " main"}' <<<"$sources"; fi >"$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  # Imported untagged and tagged once the whole tree went in: a failed import leaves no empty "$base" behind.
  id="$(tar --numeric-owner -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' -)" \
    || die "docker import of the $suite tree failed"
  docker tag "$id" "$base"
  rm -rf "$rootfs"; trap - EXIT
  say "$base imported ($(( SECONDS - start )) s)"
fi

build_args=(--build-arg "DEBIAN=$base")
for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do   # predefined: never kept in the image
  [ -n "${!var:-}" ] && build_args+=(--build-arg "$var")
done
[ "$refresh" = 1 ] && build_args+=(--no-cache)

# The three images are independent: build them side by side (mostly downloads and unpacking).
pids=() names=()
for spec in "python:3.11" "orthanc:$suite" "redis:$suite"; do
  name="$prefix/$spec" dir="${spec%%:*}"
  log="$(mktemp /tmp/her2-image-build.XXXXXX)"
  ( DOCKER_BUILDKIT=0 docker build -q "${build_args[@]}" -t "$name" "$dir" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }; rm -f "$log" ) &
  pids+=($!) names+=("$name")
done
failed=()
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${names[$i]}"); done
[ ${#failed[@]} = 0 ] || die "could not build ${failed[*]} (docker build output above)"

say "built ${names[*]} from $base"
if [ "$env_only" = 1 ]; then
  echo "export HER2_BASE_IMAGE=$prefix/python:3.11 ORTHANC_IMAGE=$prefix/orthanc:$suite REDIS_IMAGE=$prefix/redis:$suite"
else
  echo "use them with: export HER2_BASE_IMAGE=$prefix/python:3.11 ORTHANC_IMAGE=$prefix/orthanc:$suite REDIS_IMAGE=$prefix/redis:$suite"
fi
