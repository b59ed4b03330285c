#!/bin/sh
# Install (or, with --uninstall, remove) scheduled-events-agent as a systemd service.
#
#   sudo systemd/install.sh             # or: sudo make install
#   sudo systemd/install.sh --uninstall # keeps /etc/scheduled-events-agent and the state;
#   sudo systemd/install.sh --purge     # removes them too
#
# DESTDIR installs into a staging root (packaging, tests): nothing is started or enabled
# through systemctl there; the enablement symlink is made by hand, as `systemctl enable` would.
# PYTHON picks the interpreter for the virtual environment (3.9 or newer).
set -eu

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/scheduled-events-agent}"
PYTHON="${PYTHON:-python3}"
CONFIG_DIR="/etc/scheduled-events-agent"
UNIT_DIR="/etc/systemd/system"
UNIT="scheduled-events-agent.service"
SOURCE="$(cd "$(dirname "$0")/.." && pwd)"

say() { echo "install: $*"; }

systemd_running() {
  [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

install_agent() {
  say "virtual environment in $DESTDIR$PREFIX"
  "$PYTHON" -m venv "$DESTDIR$PREFIX"
  "$DESTDIR$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$SOURCE"
  install -d -m 0755 "$DESTDIR$PREFIX/share/hooks"
  cp -R "$SOURCE/hooks/." "$DESTDIR$PREFIX/share/hooks/"
  install -m 0644 "$SOURCE/README.md" "$DESTDIR$PREFIX/README.md"
  install -d -m 0755 "$DESTDIR/usr/local/bin"
  ln -sf "$PREFIX/bin/scheduled-events-agent" "$DESTDIR/usr/local/bin/scheduled-events-agent"

  say "configuration in $DESTDIR$CONFIG_DIR"
  install -d -m 0755 "$DESTDIR$CONFIG_DIR" "$DESTDIR$CONFIG_DIR/prepare.d" \
    "$DESTDIR$CONFIG_DIR/recover.d" "$DESTDIR$CONFIG_DIR/lib"
  install -m 0644 "$SOURCE/hooks/lib/common.sh" "$DESTDIR$CONFIG_DIR/lib/common.sh"
  if [ -e "$DESTDIR$CONFIG_DIR/config.yaml" ]; then
    say "keeping the existing $CONFIG_DIR/config.yaml"
  else
    install -m 0644 "$SOURCE/config.example.yaml" "$DESTDIR$CONFIG_DIR/config.yaml"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    chown -R root:root "$DESTDIR$CONFIG_DIR"
  fi
  install -d -m 0700 "$DESTDIR/var/lib/scheduled-events-agent"

  say "unit $UNIT_DIR/$UNIT"
  install -d -m 0755 "$DESTDIR$UNIT_DIR"
  sed "s|/opt/scheduled-events-agent|$PREFIX|g" "$SOURCE/systemd/$UNIT" > "$DESTDIR$UNIT_DIR/$UNIT"
  chmod 0644 "$DESTDIR$UNIT_DIR/$UNIT"
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable --now "$UNIT"
    say "enabled and started; see: systemctl status $UNIT"
  else
    install -d -m 0755 "$DESTDIR$UNIT_DIR/multi-user.target.wants"
    ln -sf "../$UNIT" "$DESTDIR$UNIT_DIR/multi-user.target.wants/$UNIT"
    say "enabled (systemd is not running here: start it with systemctl start $UNIT)"
  fi
  say "done. Example hooks: $PREFIX/share/hooks (copy the ones you need into $CONFIG_DIR)"
}

uninstall_agent() {
  purge="$1"
  if systemd_running; then
    systemctl disable --now "$UNIT" 2>/dev/null || true
  fi
  rm -f "$DESTDIR$UNIT_DIR/multi-user.target.wants/$UNIT" "$DESTDIR$UNIT_DIR/$UNIT"
  if systemd_running; then
    systemctl daemon-reload
  fi
  rm -f "$DESTDIR/usr/local/bin/scheduled-events-agent"
  rm -rf "$DESTDIR$PREFIX"
  if [ "$purge" = yes ]; then
    rm -rf "$DESTDIR$CONFIG_DIR" "$DESTDIR/var/lib/scheduled-events-agent"
    say "removed, configuration and state included"
  else
    say "removed; kept $CONFIG_DIR and /var/lib/scheduled-events-agent (--purge removes them)"
  fi
}

case "${1:-}" in
  "") install_agent ;;
  --uninstall) uninstall_agent no ;;
  --purge) uninstall_agent yes ;;
  *) echo "usage: $0 [--uninstall | --purge]" >&2; exit 2 ;;
esac
