#!/usr/bin/env bash
# System packages the default data needs (Debian): real Fashion-MNIST images, installed offline-capable.
# Installs with apt-get when run as root; otherwise prints the one command to run.
set -euo pipefail
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing ${need[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq "${need[@]}" >/dev/null; }
else
  echo "setup: missing ${need[*]}: run 'sudo apt-get install ${need[*]}' (or set demo_data.fashion_mnist_dir)" >&2
  exit 1
fi
