#!/usr/bin/env bash
# A local Ray head on loopback with token authentication on, and an MLflow tracking server (SQLite) for
# the jobs it runs. Run from the repository root with the project's environment active.
#
#   infra/local_cluster.sh start [extra `ray start` options]   start both, print where they are
#   infra/local_cluster.sh stop                                 stop both: only the processes this script started
#
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000); state in ISA_LOCAL_DIR (isa-output/local-cluster).
# The head runs in a session of its own (setsid) with a temp dir of its own; `stop` ends that session's processes
# (not `ray stop`, which stops every Ray process of the user on the machine). A port that is taken, or inside
# Ray's worker port range (10002-19999, or the --min-worker-port/--max-worker-port given), is refused before
# anything starts; a failed `ray start` stops the MLflow server this script had started.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
STATE_DIR="${ISA_LOCAL_DIR:-isa-output/local-cluster}"
WORKER_PORTS=(10002 19999) # Ray's default --min-worker-port and --max-worker-port

fail() { # fail STATUS MESSAGE
  echo "local_cluster.sh: error: $2" >&2
  exit "$1"
}

session_pids() { # the processes of session SID (the head's, started with setsid)
  ps -o pid= -s "$1" 2>/dev/null | tr -d ' ' || true
}

check_ports() { # the three ports are numbers, free, and outside Ray's worker ports (given the extra options)
  local low="${WORKER_PORTS[0]}" high="${WORKER_PORTS[1]}" list="" previous="" arg
  for arg in "$@"; do
    case "$arg" in
      --min-worker-port=*) low="${arg#*=}" ;;
      --max-worker-port=*) high="${arg#*=}" ;;
      --worker-port-list=*) list="${arg#*=}" ;;
    esac
    case "$previous" in
      --min-worker-port) low="$arg" ;;
      --max-worker-port) high="$arg" ;;
      --worker-port-list) list="$arg" ;;
    esac
    previous="$arg"
  done
  local name port
  for name in RAY_PORT DASHBOARD_PORT MLFLOW_PORT; do
    port="${!name}"
    [[ "$port" =~ ^[0-9]+$ ]] || fail 2 "$name=$port is not a port number"
    if [[ -n "$list" ]]; then
      [[ ",$list," != *",$port,"* ]] || fail 2 "$name=$port is one of Ray's worker ports ($list); choose another port"
    elif ((port >= low && port <= high)); then
      fail 2 "$name=$port is inside Ray's worker port range $low-$high (a worker may take it); choose a port outside it"
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      fail 2 "$name=$port is taken on 127.0.0.1 (another server or Ray instance); choose another port"
    fi
  done
}

term_and_wait() { # term_and_wait SID DEADLINE PID...: SIGTERM to the PIDs, then wait for them (until DEADLINE)
  local sid="$1" deadline="$2"
  shift 2
  (($# > 0)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  while ((SECONDS < deadline)) && [[ -n "$(session_pids "$sid" | grep -Fx -f <(printf '%s\n' "$@"))" ]]; do
    sleep 0.1
  done
}

stop_head() { # ray stop's order: the raylet, the other processes, the GCS last; SIGKILL to what is left after 10 s
  local sidfile="$STATE_DIR/ray.sid" sid pids deadline=$((SECONDS + 10))
  [[ -f "$sidfile" ]] || return 0
  sid="$(cat "$sidfile")"
  # shellcheck disable=SC2046 # one pid a word
  {
    term_and_wait "$sid" "$deadline" $(ps -o pid=,comm= -s "$sid" 2>/dev/null | awk '$2 == "raylet" {print $1}')
    term_and_wait "$sid" "$deadline" $(ps -o pid=,comm= -s "$sid" 2>/dev/null | awk '$2 != "gcs_server" {print $1}')
    term_and_wait "$sid" "$deadline" $(session_pids "$sid")
  }
  pids="$(session_pids "$sid")"
  # shellcheck disable=SC2086 # one pid a word
  [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
  echo "stopped the Ray head (session $sid; its logs stay in $(cat "$STATE_DIR/ray.temp_dir" 2>/dev/null || echo '?'))"
  rm -f "$sidfile" "$STATE_DIR/ray.temp_dir"
}

stop_mlflow() {
  local pidfile="$STATE_DIR/mlflow.pid"
  [[ -f "$pidfile" ]] || return 0
  local group
  group="$(cat "$pidfile")"
  kill -TERM -- "-$group" 2>/dev/null || true # the server's process group (started with setsid)
  for _ in $(seq 200); do
    kill -0 -- "-$group" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$group" 2>/dev/null || true
  rm -f "$pidfile"
  echo "stopped the MLflow server"
}

start() {
  if [[ -f "$STATE_DIR/ray.sid" && -n "$(session_pids "$(cat "$STATE_DIR/ray.sid")")" ]]; then
    fail 2 "a Ray head this script started is still running (state in $STATE_DIR); stop it first: $0 stop"
  fi
  check_ports "$@"
  mkdir -p "$STATE_DIR"
  local state tracking temp_dir status=0
  state="$(cd "$STATE_DIR" && pwd)"
  tracking="http://127.0.0.1:$MLFLOW_PORT"

  # MLflow first: the head passes MLFLOW_TRACKING_URI on to every job's driver.
  # One server process: a SQLite store takes one writer at a time, and each process more is seconds more to start.
  # No job runner: isa submits no MLflow jobs, and the runner's eight processes take about 1.3 GB.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$state/mlartifacts" \
    >"$state/mlflow.log" 2>&1 &
  echo $! >"$state/mlflow.pid"

  # A token in ~/.ray/auth_token (created once, kept after); the head and its clients read it from there.
  # The head gets a session of its own (the pid of `setsid ray start` is its id, which `stop` ends) and a temp
  # dir of its own, short: Ray's socket paths have a length limit.
  temp_dir="$(mktemp -d /tmp/isa-ray.XXXXXX)"
  echo "$temp_dir" >"$state/ray.temp_dir"
  ray get-auth-token --generate >/dev/null || status=$?
  if ((status == 0)); then
    RAY_AUTH_MODE=token MLFLOW_TRACKING_URI="$tracking" setsid ray start --head --node-ip-address=127.0.0.1 \
      --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --temp-dir="$temp_dir" "$@" &
    echo $! >"$state/ray.sid"
    wait $! || status=$?
  fi
  if ((status != 0)); then
    stop_head >/dev/null
    stop_mlflow >/dev/null
    rmdir "$temp_dir" 2>/dev/null || true # kept when Ray wrote its logs there
    fail "$status" "the Ray head did not start (see above); stopped the MLflow server this script had started"
  fi

  for _ in $(seq 240); do # MLflow takes a while to come up; say so when it does not
    python -c "import urllib.request as u; u.urlopen('$tracking/health', timeout=2)" 2>/dev/null && break
    sleep 0.5
  done || true
  python -c "import urllib.request as u; u.urlopen('$tracking/health', timeout=2)" 2>/dev/null ||
    echo "warning: MLflow is not answering at $tracking yet; see $state/mlflow.log" >&2

  cat <<EOF

Ray dashboard  http://127.0.0.1:$DASHBOARD_PORT   (it asks for the token: print it with 'ray get-auth-token')
MLflow UI      $tracking   (log: $state/mlflow.log)
Ray logs       $temp_dir

Submit a stage (paths are resolved on the cluster: give absolute paths or s3:// URIs):
  export RAY_AUTH_MODE=token   # the client then sends the token from ~/.ray/auth_token (or RAY_AUTH_TOKEN)
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . --runtime-env infra/runtime_env.yaml \\
    -- isa embed "\$PWD/isa-output/world/images" "\$PWD/isa-output/cache" --teacher isa-tiny-ViT --pretrained none
Stop: infra/local_cluster.sh stop
EOF
}

stop() {
  if [[ ! -f "$STATE_DIR/ray.sid" && ! -f "$STATE_DIR/mlflow.pid" ]]; then
    echo "nothing to stop: no Ray head or MLflow server started by this script is recorded in $STATE_DIR"
    return 0
  fi
  stop_head
  stop_mlflow
}

case "${1:-}" in
  start)
    shift
    start "$@"
    ;;
  stop) stop ;;
  *)
    echo "usage: $0 start [ray start options] | stop" >&2
    exit 2
    ;;
esac
