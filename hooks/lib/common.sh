# Sourced by the example hooks: settings, logging, and the failure notice.
# Settings come from the hooks.env file when it exists (KEY=value lines): HOOKS_ENV names it,
# /etc/scheduled-events-agent/hooks.env by default. The agent gives hooks a clean environment,
# so this file, not the agent's own environment, is where the examples' settings live.
# Every variable it sets is exported (set -a), so the programs the hooks run see them too
# (KUBECONFIG for kubectl, https_proxy for curl).
HOOKS_ENV="${HOOKS_ENV:-/etc/scheduled-events-agent/hooks.env}"
if [ -r "$HOOKS_ENV" ]; then
  set -a
  # shellcheck source=/dev/null
  . "$HOOKS_ENV"
  set +a
fi

# The hook's own file name. The agent runs the file through a descriptor, so $0 is /dev/fd/N;
# it gives the hook's path in its directory in SCHEDULED_EVENT_HOOK_PATH.
hook_name() {
  basename "${SCHEDULED_EVENT_HOOK_PATH:-$0}"
}

log() {
  # The agent logs every line a hook prints, with the hook's name and the event id.
  echo "$*"
}

# For messages from a function whose standard output is its result.
log_err() {
  echo "$*" >&2
}

# Seconds left before the agent stops this hook (SCHEDULED_EVENT_DEADLINE), less 2 for the
# hook's own cleanup, at least 1.
seconds_left() {
  deadline=$(date -d "${SCHEDULED_EVENT_DEADLINE:-}" +%s 2>/dev/null || echo 0)
  left=$((deadline - $(date +%s) - 2))
  [ "$left" -gt 0 ] && echo "$left" || echo 1
}

# Post a short JSON notice to WEBHOOK_URL (Slack and Teams incoming webhooks take {"text": ...}).
notify() {
  [ -n "${WEBHOOK_URL:-}" ] || return 0
  text="$(hostname): ${SCHEDULED_EVENT_TYPE:-} ${SCHEDULED_EVENT_ID:-} (${SCHEDULED_EVENT_PHASE:-}): $*"
  # The text goes through jq so that quotes or newlines in it cannot break the JSON.
  jq -cn --arg text "$text" '{text: $text}' |
    curl -fsS -m 10 -H 'Content-Type: application/json' --data-binary @- "$WEBHOOK_URL" >/dev/null ||
    log "notice not sent to the webhook"
}

# Call from a hook with: trap on_failure EXIT (then `trap - EXIT` on success).
on_failure() {
  status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 75 ] || notify "hook $(hook_name) failed with status $status"
}

# Send one command to the HAProxy runtime API named by HAPROXY_SOCKET and print the answer.
#   /run/haproxy/admin.sock or unix:/run/haproxy/admin.sock   a local unix socket (the default)
#   tcp:HOST:PORT                                             a TCP listener, local or remote
# HAProxy side: `stats socket /run/haproxy/admin.sock level admin` or, for TCP,
# `stats socket ipv4@10.0.0.5:9999 level admin` (anyone who reaches that port is admin: bind it
# to a private address and filter it). Needs socat. Fails, with a message on stderr, when the
# API cannot be reached.
haproxy_api() {
  socket="${HAPROXY_SOCKET:-/run/haproxy/admin.sock}"
  case "$socket" in
    tcp:?*:?*) address="$socket,connect-timeout=5" ;;
    unix:/*) address="unix-connect:${socket#unix:}" ;;
    /*) address="unix-connect:$socket" ;;
    *)
      log_err "HAPROXY_SOCKET=$socket: expected /path/to/admin.sock, unix:/path or tcp:HOST:PORT"
      return 2
      ;;
  esac
  # -t 5: after sending the command, wait up to 5 s for HAProxy to answer and close.
  printf '%s\n' "$1" | socat -t 5 -T 10 stdio "$address" || {
    log_err "cannot reach the HAProxy runtime API at $socket"
    return 1
  }
}

# HAProxy names (backend, server) hold letters, digits and - _ . : only; anything else could
# split the runtime API command line, so it is refused.
haproxy_name_ok() {
  case "$1" in
    '' | *[!A-Za-z0-9._:-]*) return 1 ;;
    *) return 0 ;;
  esac
}

# Where hooks keep what they must remember across the event's reboot (so not under /run):
# HOOKS_STATE_DIR, /var/lib/scheduled-events-agent/hooks by default.
state_dir() {
  echo "${HOOKS_STATE_DIR:-/var/lib/scheduled-events-agent/hooks}"
}

# A file name for this event's records: a hash of the EventId, which is data from Azure and
# never goes into a path as it is.
event_key() {
  [ -n "${SCHEDULED_EVENT_ID:-}" ] || { log_err "SCHEDULED_EVENT_ID is empty"; return 1; }
  printf '%s' "$SCHEDULED_EVENT_ID" | sha256sum | cut -d' ' -f1
}
