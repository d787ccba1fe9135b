#!/usr/bin/env bash
# A local Ray head on loopback with token authentication on, and an MLflow tracking server (SQLite) for
# the jobs it runs. Run from the repository root with the project's environment active.
#
#   infra/local_cluster.sh start [extra `ray start` options]   start both, print where they are
#   infra/local_cluster.sh stop                                 stop both (`ray stop`: every Ray process of this user here)
#
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000); state in ISA_LOCAL_DIR (isa-output/local-cluster).
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
STATE_DIR="${ISA_LOCAL_DIR:-isa-output/local-cluster}"

start() {
  mkdir -p "$STATE_DIR"
  local state tracking
  state="$(cd "$STATE_DIR" && pwd)"
  tracking="http://127.0.0.1:$MLFLOW_PORT"

  # MLflow first: the head passes MLFLOW_TRACKING_URI on to every job's driver.
  setsid nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$state/mlartifacts" \
    >"$state/mlflow.log" 2>&1 &
  echo $! >"$state/mlflow.pid"

  # A token in ~/.ray/auth_token (created once, kept after); the head and its clients read it from there.
  ray get-auth-token --generate >/dev/null
  RAY_AUTH_MODE=token MLFLOW_TRACKING_URI="$tracking" ray start --head --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" "$@"

  for _ in $(seq 60); do  # MLflow takes a while to come up; say so when it does not
    python -c "import urllib.request as u; u.urlopen('$tracking/health', timeout=2)" 2>/dev/null && break
    sleep 2
  done || true
  python -c "import urllib.request as u; u.urlopen('$tracking/health', timeout=2)" 2>/dev/null \
    || echo "warning: MLflow is not answering at $tracking yet; see $state/mlflow.log" >&2

  cat <<EOF

Ray dashboard  http://127.0.0.1:$DASHBOARD_PORT   (it asks for the token: print it with 'ray get-auth-token')
MLflow UI      $tracking   (log: $state/mlflow.log)

Submit a stage (paths are resolved on the cluster: give absolute paths or s3:// URIs):
  export RAY_AUTH_MODE=token   # the client then sends the token from ~/.ray/auth_token (or RAY_AUTH_TOKEN)
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . --runtime-env infra/runtime_env.yaml \\
    -- isa embed "\$PWD/isa-output/world/images" "\$PWD/isa-output/cache" --teacher isa-tiny-ViT --pretrained none
Stop: infra/local_cluster.sh stop
EOF
}

stop() {
  ray stop
  local pidfile="$STATE_DIR/mlflow.pid"
  if [[ -f "$pidfile" ]]; then
    kill -TERM -- "-$(cat "$pidfile")" 2>/dev/null || true  # the server's process group (started with setsid)
    rm -f "$pidfile"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 start [ray start options] | stop" >&2; exit 2 ;;
esac
