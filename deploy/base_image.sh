#!/usr/bin/env bash
# Creates the Docker image debian:bookworm-slim on this host from Debian's archive, for a host
# that cannot pull it from a registry; tools/deploy.py runs it when `docker pull` fails. On an
# ordinary host this is never needed: Docker pulls the official image, which every image of
# deploy/ starts FROM.
#
#   deploy/base_image.sh [TAG]      # TAG: default debian:bookworm-slim
#
# The result is made the way the official slim image is: `debootstrap --variant=minbase
# bookworm`, brought up to date from bookworm-updates and the security archive, Docker's
# minimizing configuration for apt and dpkg, documentation, man pages and translations removed,
# and a dpkg configuration that keeps them out of whatever later image steps install; one layer,
# CMD ["bash"]. Needs root (debootstrap, chroot), Debian's archive (DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR to use others) and about 30 s; the image is about 80 MB.
set -euo pipefail

tag="${1:-debian:bookworm-slim}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

# What the slim image leaves out, and the files it keeps in spite of that (licences, the
# locale names C programs read). dpkg matches these like find's -path: '*' also matches '/'.
# Quoted: they are patterns for dpkg and find, never for this shell.
slim_excludes=(
  '/usr/share/doc/*'
  '/usr/share/groff/*'
  '/usr/share/info/*'
  '/usr/share/linda/*'
  '/usr/share/lintian/overrides/*'
  '/usr/share/locale/*'
  '/usr/share/man/*'
)
slim_includes=(
  '/usr/share/doc/*/copyright'
  '/usr/share/locale/all_languages'
  '/usr/share/locale/currency/*'
  '/usr/share/locale/l10n/*'
  '/usr/share/locale/languages'
  '/usr/share/locale/locale.alias'
)

die() {
  echo "error: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run $0 as root"
command -v docker >/dev/null || die "the docker CLI is not on PATH"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon: start dockerd"
if ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || die "debootstrap is not installed and there is no apt-get to install it"
  echo "== installing debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    debootstrap debian-archive-keyring
fi

started=$SECONDS
rootfs="$(mktemp -d "${TMPDIR:-/var/tmp}/bookworm-slim.XXXXXX")"
cleanup() {
  # debootstrap mounts /proc and /sys into the tree (inside a container it binds /dev too);
  # after an interrupted run they may still be there, and rm must never reach the host's
  # files through them.
  awk -v root="$rootfs/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r mounted; do umount -l "$mounted" || true; done
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT
# Interrupted or stopped: exit, so the cleanup runs.
trap 'exit 130' INT TERM HUP

echo "== debootstrap --variant=minbase $suite $mirror"
debootstrap --variant=minbase --components=main "$suite" "$rootfs" "$mirror"

echo "== Docker's minimizing configuration"
# Image builds start no services: invoke-rc.d asks this and is told "not allowed".
cat >"$rootfs/usr/sbin/policy-rc.d" <<'EOF'
#!/bin/sh
# Services are never started while an image is built.
exit 101
EOF
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-apt-speedup" <<'EOF'
# An interrupted image build is built again from scratch, so dpkg need not sync every file.
force-unsafe-io
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
// Every install is a layer of its own: downloaded packages and apt's binary caches would stay in
// it for nothing. This empties them after each dpkg run and each update (`apt-get clean` itself
// cannot run from here: it waits for the lock the running apt holds).
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes" <<'EOF'
// Package lists stay compressed on disk: a layer that ran `apt-get update` is much smaller.
Acquire::GzipIndexes "true";
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-no-languages" <<'EOF'
// No translated package descriptions: nobody reads them in an image build.
Acquire::Languages "none";
EOF
cat >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'EOF'
// `apt-get purge --auto-remove` after a build step removes what it pulled in, even where
// another package merely suggests it.
Apt::AutoRemove::SuggestsImportant "false";
EOF
{
  echo '# A "slim" Debian image: documentation, man pages and translations are left out, and'
  echo '# this keeps them out of every package installed later too.'
  for path in "${slim_excludes[@]}"; do echo "path-exclude $path"; done
  for path in "${slim_includes[@]}"; do echo "path-include $path"; done
} >"$rootfs/etc/dpkg/dpkg.cfg.d/docker"
chmod 0644 "$rootfs"/etc/dpkg/dpkg.cfg.d/docker* "$rootfs"/etc/apt/apt.conf.d/docker-*

# The archive as the official image lists it: the release, its updates, its security fixes.
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

in_root() {
  # A private mount namespace gives apt its /dev and /proc; the mounts end with the namespace,
  # so none is left in the tree. (The inner script expands its own arguments.)
  # shellcheck disable=SC2016
  unshare --mount --propagation private -- sh -ec '
    root=$1; shift
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    exec chroot "$root" "$@"
  ' in_root "$rootfs" "$@"
}

echo "== updates from $suite-updates and $suite-security"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
in_root apt-get update -qq
in_root env DEBIAN_FRONTEND=noninteractive apt-get dist-upgrade -y -qq
in_root apt-get clean

echo "== removing documentation, man pages and translations"
find_includes=()
for path in "${slim_includes[@]}"; do find_includes+=(-o -path "$path"); done
for path in "${slim_excludes[@]}"; do
  dir="${path%/\*}"
  [ -d "$rootfs$dir" ] || continue
  # Files first (the kept ones and links stay), then empty folders and links left dangling,
  # again and again until none is left; inside the tree, so absolute links resolve there.
  in_root find "$dir" -mindepth 1 ! -type d ! -type l ! \( -false "${find_includes[@]}" \) -delete
  while [ -n "$(in_root find "$dir" -depth -mindepth 1 \( -empty -o -xtype l \) -print -delete)" ]; do
    :
  done
done

echo "== removing caches and logs of this build"
# apt makes the lists folder again, but the archives' folders are kept (partial/ is _apt's).
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
rm -f "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/archives/partial/*
rm -f "$rootfs"/var/cache/ldconfig/aux-cache "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old
find "$rootfs/var/log" -type f -delete
# Docker mounts its own over these; this host's must not stay in the image.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"
echo "rootfs: $(du -sh --one-file-system "$rootfs" | cut -f1)"

echo "== docker import $tag"
tar --numeric-owner -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . |
  docker import --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $suite, slimmed (deploy/base_image.sh)" - "$tag"
size_mb=$(($(docker image inspect --format '{{.Size}}' "$tag") / 1000000))
echo "made $tag: ${size_mb} MB in $((SECONDS - started)) s"
