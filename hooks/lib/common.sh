# Sourced by the example hooks: settings, logging, and the failure notice.
# Settings come from /etc/scheduled-events-agent/hooks.env when it exists (KEY=value lines).
HOOKS_ENV="${HOOKS_ENV:-/etc/scheduled-events-agent/hooks.env}"
if [ -r "$HOOKS_ENV" ]; then
  # shellcheck source=/dev/null
  . "$HOOKS_ENV"
fi

log() {
  # The agent logs every line a hook prints, with the hook's name and the event id.
  echo "$*"
}

# Seconds left before the agent stops this hook (SCHEDULED_EVENT_DEADLINE), at least 1.
seconds_left() {
  deadline=$(date -d "$SCHEDULED_EVENT_DEADLINE" +%s 2>/dev/null || echo 0)
  left=$((deadline - $(date +%s) - 2))
  [ "$left" -gt 0 ] && echo "$left" || echo 1
}

# Post a short JSON notice to WEBHOOK_URL (Slack and Teams incoming webhooks take {"text": ...}).
notify() {
  [ -n "${WEBHOOK_URL:-}" ] || return 0
  text="$(hostname): $SCHEDULED_EVENT_TYPE $SCHEDULED_EVENT_ID ($SCHEDULED_EVENT_PHASE): $*"
  # The text goes through jq so that quotes or newlines in it cannot break the JSON.
  jq -cn --arg text "$text" '{text: $text}' |
    curl -fsS -m 10 -H 'Content-Type: application/json' --data-binary @- "$WEBHOOK_URL" >/dev/null ||
    log "notice not sent to the webhook"
}

# Call from a hook with: trap on_failure EXIT (then `trap - EXIT` on success).
on_failure() {
  status=$?
  [ "$status" -eq 0 ] || [ "$status" -eq 75 ] || notify "hook $(basename "$0") failed with status $status"
}
