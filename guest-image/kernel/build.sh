#!/usr/bin/env bash
# Builds the Keystone guest kernel from Debian's linux-source-6.12 package,
# the config fragment and the patches beside this script, and caches it under
# ${XDG_CACHE_HOME:-$HOME/.cache}/keystone/kernel/<recipe hash>/.
#
# Prints the cache folder (holding vmlinux, bzImage and config) on stdout;
# progress goes to stderr. A second run with the same recipe is instant.
#
#   guest-image/kernel/build.sh            build or reuse
#   guest-image/kernel/build.sh --hash     print the recipe hash only
#
# Needs: linux-source-6.12 bc bison flex libelf-dev cpio lz4 xz-utils make gcc
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src_tar=${KEYSTONE_LINUX_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/keystone/kernel

if [ ! -f "$src_tar" ]; then
	echo "error: $src_tar not found; install it with: apt-get install linux-source-6.12" >&2
	exit 4
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || stat -c %s "$src_tar")
recipe_hash=$({
	echo "source $src_version"
	cat "$here/build.sh" "$here/keystone.config"
	cat "$here"/patches/*.patch
} | sha256sum | cut -c1-16)

if [ "${1:-}" = "--hash" ]; then
	echo "$recipe_hash"
	exit 0
fi

out="$cache_root/$recipe_hash"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
	echo "$out"
	exit 0
fi

mkdir -p "$cache_root"
# One build at a time per recipe; a second caller waits and reuses it.
exec 9>"$cache_root/.$recipe_hash.lock"
flock 9
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
	echo "$out"
	exit 0
fi

work=$(mktemp -d "$cache_root/.build-$recipe_hash.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "keystone: building guest kernel $recipe_hash (linux-source $src_version); a few minutes on 2 cores" >&2
tar -xf "$src_tar" -C "$work"
tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
for p in "$here"/patches/*.patch; do
	echo "keystone: applying $(basename "$p")" >&2
	patch -d "$tree" -p1 --quiet --forward < "$p"
done

jobs=$(nproc)
make -C "$tree" -s tinyconfig >&2
"$tree/scripts/kconfig/merge_config.sh" -m -O "$tree" "$tree/.config" "$here/keystone.config" >/dev/null
make -C "$tree" -s olddefconfig >&2

# Every line of the fragment must have survived the dependency resolution.
missing=0
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*)
		grep -qxF "$line" "$tree/.config" || { echo "error: kernel config lost '$line'" >&2; missing=1; }
		;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }; opt=${opt%% *}
		if grep -q "^$opt=" "$tree/.config"; then echo "error: kernel config kept '$opt' on" >&2; missing=1; fi
		;;
	esac
done < "$here/keystone.config"
[ "$missing" = 0 ] || exit 3

make -C "$tree" -s -j"$jobs" vmlinux bzImage >&2
mkdir -p "$work/out"
cp "$tree/vmlinux" "$tree/arch/x86/boot/bzImage" "$tree/.config" "$work/out/"
mv "$work/out/.config" "$work/out/config"
strip --strip-debug "$work/out/vmlinux" 2>/dev/null || true
rm -rf "$out"
mv "$work/out" "$out"
echo "keystone: guest kernel ready in $out" >&2
echo "$out"
