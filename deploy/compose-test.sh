#!/usr/bin/env bash
# The whole stack of compose.yaml in containers, end to end (run by deploy/test.sh, so by CI):
#
#   1. a container engine: Debian docker.io + docker-compose (+ debootstrap) installed with apt when missing,
#      dockerd started when none answers (and stopped again at the end);
#   2. images: deploy/images/build.sh (Debian base by debootstrap, Python, Orthanc and Redis from Debian
#      packages; no registry needed) unless HER2_BASE_IMAGE, ORTHANC_IMAGE and REDIS_IMAGE are all set,
#      then `compose build` of the worker image on that base;
#   3. default profile (spool + C-STORE): a synthetic 40x slide (her2 synth) sent from this host with dcmtk
#      storescu to the Orthanc container comes back as SR + SEG + ANN in its study, with the right call in the SR;
#   4. profile remote (DICOMweb + STOW-RS) with --scale worker=0 --scale worker-remote=2: a second slide
#      scored, and a third one whose worker is killed (docker kill) mid-slide finishes on the other worker;
#   5. `down -v`: no container, volume or network of the run is left.
#
# Passwords are generated per run; published ports are on 127.0.0.1 (free ones, chosen per run).
# HER2_COMPOSE_TEST=auto (default: skipped with one line when no engine can be started), always (that is
# a failure too) or never. Every wait is bounded; a failure ends with one line "compose test FAILED: ...".
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
mode="${HER2_COMPOSE_TEST:-auto}"
t0=$SECONDS
case "$mode" in
  never) echo "compose test skipped (HER2_COMPOSE_TEST=never)"; exit 0 ;;
  auto|always) ;;
  *) echo "compose-test.sh: HER2_COMPOSE_TEST must be auto, always or never, not '$mode'" >&2; exit 2 ;;
esac

log() { printf '[compose test %3d s] %s\n' "$(( SECONDS - t0 ))" "$*"; }
skip() {
  [ "$mode" = always ] && fail "$* (HER2_COMPOSE_TEST=always)"
  echo "compose test skipped: $*"; exit 0
}

work="$(mktemp -d /tmp/her2-compose-test.XXXXXX)"
project="her2ct$$"
dockerd_pid="" synth_pid="" stack_up=0 ca_copies=() stack_env=()
export COMPOSE_PROJECT_NAME="$project" COMPOSE_FILE="$repo/compose.yaml"

# docker compose (v2) when the CLI has it, else docker-compose (Debian's 1.29); the stack's settings and
# passwords go to it only (HER2_* in this shell would also reach the host's her2 commands).
# compose SECONDS ARGS...: bounded like every other wait.
compose() {
  local limit=$1; shift
  if docker compose version >/dev/null 2>&1; then timeout "$limit" env "${stack_env[@]}" docker compose "$@"
  else timeout "$limit" env "${stack_env[@]}" docker-compose "$@"; fi
}

# Service states for a failure report: every container of the run, its health, its last log lines.
diagnose() {
  [ "$stack_up" = 1 ] || return 0
  echo "--- containers of $project:" >&2
  docker ps -a --filter "label=com.docker.compose.project=$project" \
    --format '{{.Names}}  {{.Status}}' >&2 2>/dev/null || true
  for c in $(docker ps -aq --filter "label=com.docker.compose.project=$project" 2>/dev/null); do
    echo "--- last log lines of $(docker inspect -f '{{.Name}}' "$c" 2>/dev/null):" >&2
    docker logs --tail 15 "$c" 2>&1 | sed 's/^/    /' >&2 || true
  done
}
fail() {
  diagnose
  echo "compose test FAILED after $(( SECONDS - t0 )) s: $*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  set +e
  [ -n "$synth_pid" ] && kill "$synth_pid" 2>/dev/null && wait "$synth_pid" 2>/dev/null
  if [ "$stack_up" = 1 ]; then
    compose 120 --profile remote down -v --remove-orphans --timeout 10 >"$work/down.log" 2>&1 || cat "$work/down.log" >&2
    # Whatever `down` missed (a hung engine call): containers, volumes and the network of this run only.
    docker ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r docker rm -f >/dev/null 2>&1
    docker volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker volume rm >/dev/null 2>&1
    docker network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r docker network rm >/dev/null 2>&1
  fi
  for f in "${ca_copies[@]}"; do rm -f "$f"; done
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$dockerd_pid" 2>/dev/null
    wait "$dockerd_pid" 2>/dev/null
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'fail "unexpected failure (exit status $?) of: $BASH_COMMAND (line $LINENO)"' ERR

# --- 1. the engine ---------------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing ${missing[*]} with apt"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"; } \
      >"$work/apt.log" 2>&1 \
    || skip "could not install ${missing[*]} with apt ($(tail -n 1 "$work/apt.log"))"
fi
if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || skip "no Docker engine answers and starting dockerd needs root"
  command -v dockerd >/dev/null || skip "no Docker engine answers and there is no dockerd"
  dockerd >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    reason="$(grep -E 'level=(error|fatal)' "$work/dockerd.log" | tail -n 1 | sed 's/.*msg="\([^"]*\)".*/\1/' || true)"
    kill "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; dockerd_pid=""
    skip "dockerd could not be started: ${reason:-no answer within 60 s}"
  fi
  log "dockerd started (pid $dockerd_pid; stopped again at the end)"
fi
[ -x .venv/bin/her2 ] || fail "no .venv/bin/her2 (run bash deploy/install.sh --dev --services)"
command -v storescu >/dev/null || fail "no storescu (dcmtk: bash deploy/install.sh --services)"

# Containers of an earlier run that died before its cleanup (same prefix, another pid): removed first.
for old in $(docker ps -a --format '{{.Label "com.docker.compose.project"}}' | grep -E '^her2ct[0-9]+$' | sort -u || true); do
  log "removing the leftovers of an earlier run ($old)"
  docker ps -aq --filter "label=com.docker.compose.project=$old" | xargs -r docker rm -f >/dev/null
  docker volume ls -q --filter "label=com.docker.compose.project=$old" | xargs -r docker volume rm >/dev/null
  docker network ls -q --filter "label=com.docker.compose.project=$old" | xargs -r docker network rm >/dev/null
done

# The slide, drawn while the images build (one core; mostly downloads meanwhile); slides 2 and 3 are copies
# of it as other patients' (every UID of its own replaced: compose_check.py copy), made in a second.
timeout 300 .venv/bin/her2 synth -q --out "$work/slide1" --seed 3201 --grade 3+ --size 1000x1000 --magnification 40 \
  --patient-id COMPOSE-TEST >"$work/synth.log" 2>&1 &
synth_pid=$!

# --- 2. images -------------------------------------------------------------------------------------------
if [ -n "${HER2_BASE_IMAGE:-}" ] && [ -n "${ORTHANC_IMAGE:-}" ] && [ -n "${REDIS_IMAGE:-}" ]; then
  log "images as given: $HER2_BASE_IMAGE, $ORTHANC_IMAGE, $REDIS_IMAGE"
else
  step=$SECONDS
  timeout 900 bash deploy/images/build.sh --env >"$work/images.env" 2>"$work/images.log" \
    || { cat "$work/images.log" >&2; fail "deploy/images/build.sh could not build the base images (output above)"; }
  # shellcheck disable=SC1091
  source "$work/images.env"
  log "base images from Debian packages in $(( SECONDS - step )) s: $HER2_BASE_IMAGE, $ORTHANC_IMAGE, $REDIS_IMAGE"
fi
# pip in the build stage trusts this host's extra CA certificates (a TLS-intercepting proxy): copies in the
# build context for the duration of the build, removed at the end; never in the image that runs.
for f in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$f" ] || continue
  copy="deploy/ca-certificates/compose-test-$(basename "$f")"
  cp "$f" "$copy"; ca_copies+=("$repo/$copy")
done

mapfile -t port < <(.venv/bin/python deploy/compose_check.py ports 3)
REDIS_PASSWORD="$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')"
ORTHANC_PASSWORD="$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(16))')"
export ORTHANC_URL="http://127.0.0.1:${port[0]}" ORTHANC_PASSWORD   # for compose_check.py
stack_env=(COMPOSE_PROJECT_NAME="$project" COMPOSE_FILE="$repo/compose.yaml"
  REDIS_PASSWORD="$REDIS_PASSWORD" ORTHANC_PASSWORD="$ORTHANC_PASSWORD"
  HER2_BASE_IMAGE="$HER2_BASE_IMAGE" ORTHANC_IMAGE="$ORTHANC_IMAGE" REDIS_IMAGE="$REDIS_IMAGE"
  ORTHANC_HTTP_PORT="${port[0]}" ORTHANC_DICOM_PORT="${port[1]}" HER2_LISTENER_PUBLISHED_PORT="${port[2]}"
  HER2_PUBLISH_ADDRESS=127.0.0.1 ORTHANC_STABLE_AGE=3 HER2_STABLE_SECONDS=3)

step=$SECONDS
stack_up=1   # from here on, cleanup takes the project down
compose 900 build listener >"$work/build.log" 2>&1 \
  || { tail -n 30 "$work/build.log" >&2; fail "the worker image did not build on $HER2_BASE_IMAGE (output above)"; }
log "worker image built on $HER2_BASE_IMAGE in $(( SECONDS - step )) s"

# --- helpers on the running stack ------------------------------------------------------------------------
containers() {  # ids of the running containers of one service
  docker ps -q --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$1"
}
# wait_healthy TIMEOUT SERVICE=COUNT...: until each service has COUNT running containers, all healthy.
wait_healthy() {
  local timeout=$1 start=$SECONDS; shift
  while :; do
    local ready=1 spec svc want ids c state health
    for spec in "$@"; do
      svc=${spec%=*} want=${spec#*=}
      for c in $(docker ps -aq --filter "label=com.docker.compose.project=$project" \
                   --filter "label=com.docker.compose.service=$svc"); do
        state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c")
        case "$state" in
          exited*|dead*) fail "service $svc stopped (exit status ${state#* }): $(docker logs --tail 1 "$c" 2>&1)" ;;
        esac
        health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$c")
        if [ "$health" = unhealthy ]; then
          fail "service $svc unhealthy: $(docker inspect -f '{{json .State.Health.Log}}' "$c" | .venv/bin/python -c \
                 'import json, sys; print(" ".join(json.load(sys.stdin)[-1]["Output"].split())[:300])')"
        fi
        [ "$health" = healthy ] || ready=0
      done
      ids=$(containers "$svc" | wc -l)
      [ "$ids" = "$want" ] || ready=0
    done
    [ "$ready" = 1 ] && return 0
    (( SECONDS - start < timeout )) || fail "services not healthy within $timeout s: $*"
    sleep 2
  done
}
send() {  # send SLIDE_DIR: C-STORE from this host to the Orthanc container, as a scanner or PACS would
  timeout 120 storescu -R -xy -aet HER2TEST -aec ORTHANC 127.0.0.1 "${port[1]}" "$1"/*.dcm >"$work/storescu.log" 2>&1 \
    || fail "storescu could not store $(basename "$1") into Orthanc: $(tail -n 2 "$work/storescu.log" | tr '\n' ' ')"
}
redis_cli() {  # the job-state database (db 2) of the stack's Redis; the password goes by environment
  REDISCLI_AUTH="$REDIS_PASSWORD" docker exec -e REDISCLI_AUTH "$(containers redis)" redis-cli -n 2 "$@"
}
holder_of() {  # container id whose worker holds the running job of series $1 (empty when none does)
  local key task host
  for key in $(redis_cli --scan --pattern 'her2:lease:*'); do
    task=${key#her2:lease:}
    [ "$(redis_cli hget "her2:attempt:$task" series)" = "$1" ] || continue
    host=$(redis_cli get "$key"); host=${host%%:*}
    [ -n "$host" ] || continue
    docker ps -q --no-trunc --filter "label=com.docker.compose.project=$project" | grep "^$host" | head -n 1 || true
    return 0
  done
}
wait_holder() {  # wait_holder SERIES TIMEOUT: prints the container scoring it, once it holds its lease
  local start=$SECONDS c
  while (( SECONDS - start < $2 )); do
    c=$(holder_of "$1")
    [ -n "$c" ] && { echo "$c"; return 0; }
    sleep 1
  done
  return 1
}
results() {  # results SLIDE_DIR TIMEOUT: SR + SEG + ANN in the slide's study with the slide's true call
  local study call
  read -r study _ call < <(.venv/bin/python deploy/compose_check.py slide "$1")
  .venv/bin/python deploy/compose_check.py results "$study" "$call" "$2" 2>"$work/check.err" \
    || fail "$(basename "$1"): $(cat "$work/check.err")"
}
series_of() { .venv/bin/python deploy/compose_check.py slide "$1" | cut -d' ' -f2; }
slides_ready() {
  local start=$SECONDS
  while kill -0 "$synth_pid" 2>/dev/null && (( SECONDS - start < 300 )); do sleep 1; done
  wait "$synth_pid" || fail "her2 synth could not draw the test slide: $(tail -n 3 "$work/synth.log" | tr '\n' ' ')"
  synth_pid=""
  for n in 2 3; do
    .venv/bin/python deploy/compose_check.py copy "$work/slide1" "$work/slide$n" "$n" 2>"$work/copy.err" \
      || fail "could not copy the test slide: $(tail -n 1 "$work/copy.err")"
  done
}

# --- 3. default profile: slides from the spool, results by C-STORE ---------------------------------------
step=$SECONDS
compose 300 up -d --no-build >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "compose up did not start the stack (output above)"; }
wait_healthy 180 orthanc=1 redis=1 listener=1 worker=1
log "orthanc, redis, listener, worker healthy in $(( SECONDS - step )) s"
# Nothing but loopback: every published port of the run is bound to 127.0.0.1.
exposed=$(docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Ports}}' | tr ',' '\n' \
          | grep -- '->' | grep -v '127\.0\.0\.1:' || true)
[ -z "$exposed" ] || fail "ports published beyond loopback: $exposed"
slides_ready
step=$SECONDS
send "$work/slide1"
log "slide 1 (40x, 1 x 1 mm) stored into Orthanc; waiting for its results"
done1=$(results "$work/slide1" 300) || exit 1
log "$done1 ($(( SECONDS - step )) s from C-STORE)"

# --- 4. profile remote: DICOMweb source, STOW-RS delivery, two workers; one killed mid-slide ----------------
step=$SECONDS
stack_env+=(HER2_SLIDE_SOURCE=dicomweb HER2_RESULT_DELIVERY=stow)
compose 300 --profile remote up -d --no-build --scale worker=0 --scale worker-remote=2 >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "compose --profile remote up did not start (output above)"; }
wait_healthy 180 orthanc=1 redis=1 listener=1 worker=0 worker-remote=2
log "profile remote: listener (header-only) and 2 worker-remote healthy in $(( SECONDS - step )) s"
step=$SECONDS
send "$work/slide2"
done2=$(results "$work/slide2" 300) || exit 1
log "$done2 ($(( SECONDS - step )) s from C-STORE, read over DICOMweb, stored by STOW-RS)"

# The kill: a 1 x 1 mm slide takes a worker only seconds, too short to catch it reliably mid-slide; both
# workers are held to a fifth of a core (docker update --cpus) while slide 3 is taken up, the one that
# takes it is killed, the other gets its cores back at once and must finish the slide (lease expiry,
# 30 s, then a new attempt).
series3=$(series_of "$work/slide3")
for c in $(containers worker-remote); do docker update --cpus 0.2 "$c" >/dev/null; done
step=$SECONDS
send "$work/slide3"
victim=$(wait_holder "$series3" 120) || fail "slide 3 was not taken up by a worker within 120 s"
victim_name=$(docker inspect -f '{{.Name}}' "$victim" | tr -d /)
docker kill "$victim" >/dev/null
killed_at=$SECONDS
survivor=$(containers worker-remote | grep -v "^${victim:0:12}" | head -n 1 || true)
[ -n "$survivor" ] || fail "no worker-remote left running after the kill"
docker update --cpus "$(nproc)" "$survivor" >/dev/null
survivor_name=$(docker inspect -f '{{.Name}}' "$survivor" | tr -d /)
log "slide 3 taken up by $victim_name $(( killed_at - step )) s after C-STORE: killed it (docker kill)"
done3=$(results "$work/slide3" 300) || exit 1
log "$done3 ($(( SECONDS - killed_at )) s after the kill)"
docker logs "$survivor" >"$work/survivor.log" 2>&1
grep -q "series $series3 scored" "$work/survivor.log" \
  || fail "slide 3's results are in Orthanc but $survivor_name did not log scoring it"
[ "$(docker inspect -f '{{.State.Running}}' "$victim")" = false ] \
  || fail "the killed worker $victim_name runs again (restart policy?): who finished slide 3 is unclear"
log "slide 3 finished on $survivor_name after $victim_name was killed mid-slide"

# --- 5. down -v --------------------------------------------------------------------------------------------
step=$SECONDS
compose 120 --profile remote down -v --remove-orphans --timeout 10 >"$work/down.log" 2>&1 || { cat "$work/down.log" >&2; fail "compose down -v failed (output above)"; }
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project"; \
       docker volume ls -q --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || fail "compose down -v left containers or volumes behind: $left"
stack_up=0
log "down -v in $(( SECONDS - step )) s: no container or volume of the run left"
echo "compose test passed in $(( SECONDS - t0 )) s"
