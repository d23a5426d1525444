#!/bin/sh
# Leaves out of the server image's venv what serving on a CPU never loads (run in the build stage):
# - triton: torch.compile's GPU code generator; serving runs TorchScript and ONNX Runtime.
# - the CUDA libraries nothing links to. PyPI has only the CUDA build of torch 2.14.1 (no "+cpu" wheel:
#   local versions are not allowed there), and `import torch` needs the CUDA libraries that its own
#   libraries link to (libcudart, libcublas, ...), so those stay; the rest (cuDNN's engine libraries,
#   cusolverMg, the alternative NVRTC, ...) is loaded only with a GPU, on first use. Headers go too.
# CUDA_LIBS=keep leaves everything in place (an image to run on a GPU).
set -eu
venv=${1:-/opt/venv}
site=$(echo "$venv"/lib/python3*/site-packages)
"$venv/bin/pip" uninstall -q -y triton
rm -rf "$site/torch/include" "$site/torch/share/cmake"
find "$site" -name '*.a' -delete
[ "${CUDA_LIBS:-prune}" = keep ] && exit 0
nv=$(readlink -f "$site/nvidia")
# Every library in the closure of what torch's (and torchvision's) own libraries link to, by ldd; torch
# finds them by RPATH ($ORIGIN/../../nvidia/...), so the paths are made canonical before they are matched.
ldd "$site"/torch/lib/*.so* "$site"/torch/_C*.so $(ls "$site"/torchvision/*.so 2>/dev/null) 2>/dev/null \
  | awk '/=> \// {print $3}' | xargs -r readlink -f | grep "^$nv/" | sort -u > /tmp/needed
if grep -q "not found" /tmp/needed 2>/dev/null || ! grep -q libcudart /tmp/needed; then
  echo "prune-venv: torch's CUDA libraries not found by ldd; nothing removed" >&2; exit 1
fi
find "$nv" \( -name '*.so' -o -name '*.so.*' \) -type f | while read -r lib; do
  grep -qxF "$(readlink -f "$lib")" /tmp/needed || rm -f "$lib"
done
find "$nv" -type d -name include -prune -exec rm -rf {} +
echo "kept $(wc -l < /tmp/needed) CUDA libraries: $(du -sh "$nv" | cut -f1)"
