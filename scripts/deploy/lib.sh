# shellcheck shell=bash
# Shared by the deploy scripts (sourced, not run): start a server in its own process group, wait until it answers
# /v1/models, and stop every server this script started when it exits.
#
#   start_server NAME DEVICE CMD...   DEVICE: the GPU(s) for CUDA_VISIBLE_DEVICES, or cpu or - (left as it is)
#   wait_ready URL PID NAME           polls URL/v1/models twice a second for READY_TIMEOUT s (default 900)
#
# Logs go to $LOG_DIR/NAME.log. The EXIT trap sends SIGTERM to each started group, then SIGKILL after 30 s.

server_pids=()

start_server() {
  local name=$1 device=$2
  shift 2
  mkdir -p "$LOG_DIR"
  if [[ $device == cpu || $device == - ]]; then
    setsid "$@" >"$LOG_DIR/$name.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=$device setsid "$@" >"$LOG_DIR/$name.log" 2>&1 &
  fi
  # a background job is no group leader, so setsid execs in place: $! is the new group's id
  server_pids+=("$!")
  echo "[deploy] $name (pid $!, device $device): $*" >&2
}

wait_ready() {
  local url=$1 pid=$2 name=$3 waited=0
  until curl -sf -o /dev/null "$url/v1/models"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "[deploy] $name exited before answering $url/v1/models; the end of $LOG_DIR/$name.log:" >&2
      tail -n 40 "$LOG_DIR/$name.log" >&2
      return 1
    fi
    if ((waited >= 2 * ${READY_TIMEOUT:-900})); then
      echo "[deploy] $name did not answer $url/v1/models within ${READY_TIMEOUT:-900} s; see $LOG_DIR/$name.log" >&2
      return 1
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  echo "[deploy] $name is up at $url (after $((waited / 2)) s)" >&2
}

stop_servers() {
  local pid waited=0
  ((${#server_pids[@]})) || return 0
  for pid in "${server_pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${server_pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((waited < 30)); do
      sleep 1
      waited=$((waited + 1))
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  echo "[deploy] stopped ${#server_pids[@]} server(s)" >&2
}

trap stop_servers EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
