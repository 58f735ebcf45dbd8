#!/usr/bin/env bash
# System packages (Debian), installed offline-capable. Required: real Fashion-MNIST images for the default data.
# Optional: the real photos of the held-out copy-detection benchmark (benchmarks/copy_detection.py; its tests
# skip without them) and Chromium (the browser test of the Prefect UI); a failure to install them never fails the
# set-up. Installs with apt-get when run as root;
# otherwise prints the one command to run.
set -euo pipefail
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
optional=()
[ -d /usr/share/backgrounds/mate/nature ] || optional+=(mate-backgrounds)
[ -d /usr/share/wallpapers/Autumn/contents/images ] || optional+=(plasma-workspace-wallpapers)
[ -d /usr/share/doc/opencv-doc/examples/data ] || optional+=(opencv-doc)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || optional+=(chromium)
[ ${#need[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$@" >/dev/null 2>&1; }
}
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]} with apt-get" >&2
    apt_install "${need[@]}" || { echo "setup: could not install ${need[*]} with apt-get" >&2; exit 1; }
  fi
  if [ ${#optional[@]} -gt 0 ]; then
    echo "setup: installing ${optional[*]} (optional: held-out copy-detection photos, UI browser test) with apt-get" >&2
    apt_install "${optional[@]}" || echo "setup: optional ${optional[*]} not installed; their tests skip" >&2
  fi
elif [ ${#need[@]} -gt 0 ]; then
  echo "setup: missing ${need[*]}: run 'sudo apt-get install ${need[*]} ${optional[*]}' (or set demo_data.fashion_mnist_dir)" >&2
  exit 1
else
  echo "setup: optional ${optional[*]} missing (copy-detection bench, UI browser test): 'sudo apt-get install ${optional[*]}'" >&2
fi
