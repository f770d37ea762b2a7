# Sourced by scripts/test: the console's browser tests drive Debian's headless Chromium (never a downloaded
# browser build). Installs it when missing and we are root with apt-get; otherwise those tests fail loudly.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the console's browser tests ..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
