#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe) at Mesa >= 25 where the distribution has it.
# moec is correct on any lavapipe, but Mesa 25 runs its kernels 2-5x faster than Debian 12's Mesa 22.3
# and compiles them about 5x faster (README "Setup"). Idempotent: does nothing when Mesa >= 25 is there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

mesa_major() {
  dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^([0-9]+:)?([0-9]+).*/\2/'
}

have=$(mesa_major || true)
if [ -n "$have" ] && [ "$have" -ge 25 ]; then
  exit 0
fi

. /etc/os-release
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  # Debian 12: Mesa 25 comes from bookworm-backports.
  if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
  fi
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers >/dev/null
else
  # Debian 13+ and Ubuntu 25.04+ ship Mesa >= 25; older Ubuntu gets Mesa 24 (still fast) or older.
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
echo "lavapipe: mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers)"
