#!/usr/bin/env bash
# Triton's perf_analyzer, unmodified, on a host whose C library is older than it needs.
#
#   tools/perf_analyzer.sh -m convnet -i grpc -u 127.0.0.1:8001 --input-data data.json ...
#   tools/perf_analyzer.sh --prepare    fetch and check everything, run nothing
#
# The binary is the one in the perf-analyzer wheel (what tritonclient's "perf-analyzer" extra
# installs), pinned by version and hash. That wheel is tagged manylinux_2_38: the binary needs
# glibc 2.38 and libstdc++'s GLIBCXX_3.4.32, newer than Debian 12's, so pip on such a host
# passes it over (and settles for a 0.1.0 placeholder without the binary). This script
# downloads the wheel for that platform explicitly and runs the binary as it is — directly
# when the host's libraries can, else through the dynamic loader of Debian 13 (trixie) with
# trixie's libraries as its library path: the packages that hold what the binary links
# (readelf -d: libc and libm, libstdc++, libgcc_s, libssl and libcrypto, libz; libcrypto
# needs libzstd), unpacked with dpkg-deb. That is a 25 MB folder made in seconds without
# root. A debootstrap'd trixie is ~90 packages, takes minutes and root (its second stage
# runs in a chroot); a container adds a Docker engine to install and run. perf_analyzer
# needs neither: it only has to find newer libraries, and it sees the host's network, /etc
# and files as any program does.
#
# Everything lives in PERF_ANALYZER_CACHE (default .cache/perf_analyzer/ in the repository,
# git-ignored), made once under a lock, checked before it is moved into place (every library
# the loader resolves comes from the trixie folder; `--version` runs), so an interrupted
# or failed preparation leaves nothing half-made. Each download has a time limit, and so has
# each run (PERF_ANALYZER_TIMEOUT_S, default 900 s).
#
# Needs python3 with pip (the repository's .venv/ when there is one; PYTHON to choose), and,
# where the host cannot run the binary, apt-get and dpkg-deb: trixie's packages come from
# the Debian archive this host's apt uses, or DEBIAN_MIRROR (required on a host that is not
# Debian). The trixie archive key must be in /usr/share/keyrings/debian-archive-keyring.gpg
# (Debian 12's debian-archive-keyring has it).
#
# Exit status: perf_analyzer's own; 3 when perf_analyzer cannot be had on this host (the
# reason on stderr); 124 when a run outlasted PERF_ANALYZER_TIMEOUT_S.
set -euo pipefail

readonly PA_VERSION=2.60.0
readonly WHEEL_SHA256=23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25
readonly PLATFORM=manylinux_2_38_x86_64
readonly SUITE=trixie
readonly PACKAGES=(libc6 libgcc-s1 libstdc++6 libssl3t64 libzstd1 zlib1g)
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly MULTIARCH=x86_64-linux-gnu
readonly DOWNLOAD_TIMEOUT_S=300
readonly LOCK_TIMEOUT_S=900

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${PERF_ANALYZER_CACHE:-$repo/.cache/perf_analyzer}
binary=$cache/$PA_VERSION/perf_analyzer
sysroot=$cache/sysroot-$SUITE
libs=$sysroot/usr/lib/$MULTIARCH
loader=$libs/ld-linux-x86-64.so.2

unavailable() {
    echo "tools/perf_analyzer.sh: perf_analyzer is not available here: $*" >&2
    exit 3
}

# The last lines of a step's log, for a message that says why it failed.
log_tail() {
    tail -n 3 "$1" | tr '\n' ' '
}

python_with_pip() {
    local python
    if [ -n "${PYTHON:-}" ]; then
        python=$PYTHON
    elif [ -x "$repo/.venv/bin/python" ]; then
        python=$repo/.venv/bin/python
    else
        python=python3
    fi
    "$python" -m pip --version >/dev/null 2>&1 || unavailable "$python has no pip to download the perf-analyzer wheel (set PYTHON, or run 'make install')"
    echo "$python"
}

fetch_binary() {
    local work=$1 python
    python=$(python_with_pip)
    # A hash in the requirement puts pip in hash-checking mode: the wheel is the pinned one.
    echo "perf-analyzer==$PA_VERSION --hash=sha256:$WHEEL_SHA256" >"$work/requirements.txt"
    timeout "$DOWNLOAD_TIMEOUT_S" "$python" -m pip download --no-deps --only-binary=:all: \
        --platform "$PLATFORM" --dest "$work/wheel" --requirement "$work/requirements.txt" \
        >"$work/pip.log" 2>&1 ||
        unavailable "could not download the perf-analyzer $PA_VERSION wheel: $(log_tail "$work/pip.log")"
    "$python" -m zipfile -e "$work"/wheel/perf_analyzer-"$PA_VERSION"-*.whl "$work/wheel/files"
    mkdir -p "$work/$PA_VERSION"
    install -m 0755 "$work/wheel/files/perf_analyzer/bin/perf_analyzer" "$work/$PA_VERSION/"
    mv "$work/$PA_VERSION" "$cache/"
}

# The Debian archive this host's apt reads its own release from; nothing on a host that is
# not Debian (an Ubuntu archive has no trixie).
host_mirror() {
    local id codename
    # shellcheck source=/dev/null
    read -r id codename < <(. /etc/os-release && echo "${ID:-none} ${VERSION_CODENAME:-none}")
    [ "$id" = debian ] || return 0
    # shellcheck disable=SC2016  # apt-get expands $(...) in --format itself
    apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' |
        awk -v suite="$codename" '$2 == suite && $3 == "main" && !found { print $1; found = 1 }'
}

build_sysroot() {
    local work=$1 mirror root=$1/root
    if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
        unavailable "this host cannot run perf_analyzer's binary and has no apt-get/dpkg-deb to fetch $SUITE's libraries for it"
    fi
    mirror=${DEBIAN_MIRROR:-$(host_mirror)}
    [ -n "$mirror" ] ||
        unavailable "found no Debian archive in this host's apt sources to take $SUITE's libraries from; set DEBIAN_MIRROR"
    mkdir -p "$work/apt/lists/partial" "$work/apt/archives/partial" "$work/apt/sources" "$root"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$SUITE" "$KEYRING" >"$work/apt/sources/$SUITE.sources"
    : >"$work/apt/status"
    # apt on its own files only: trixie's index, an empty package database, no host
    # sources or pins; the host's apt.conf.d (proxies, say) still applies.
    local apt=(
        -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$work/apt/sources"
        -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$work/apt/sources"
        -o "Dir::State::Lists=$work/apt/lists" -o "Dir::State::status=$work/apt/status"
        -o "Dir::Cache=$work/apt" -o "Dir::Cache::archives=$work/apt/archives"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
        -o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Acquire::Languages=none
        # Root's downloads would go through the _apt user, who cannot write to this folder.
        -o APT::Sandbox::User=root
    )
    timeout "$DOWNLOAD_TIMEOUT_S" apt-get "${apt[@]}" --error-on=any update >"$work/apt.log" 2>&1 ||
        unavailable "apt-get update for $SUITE ($mirror) failed: $(log_tail "$work/apt.log")"
    (cd "$work/apt/archives" &&
        timeout "$DOWNLOAD_TIMEOUT_S" apt-get "${apt[@]}" download "${PACKAGES[@]}") \
        >>"$work/apt.log" 2>&1 ||
        unavailable "downloading ${PACKAGES[*]} from $SUITE failed: $(log_tail "$work/apt.log")"
    local deb
    for deb in "$work"/apt/archives/*.deb; do
        dpkg-deb --extract "$deb" "$root"
    done
    local work_libs=$root/usr/lib/$MULTIARCH listing foreign
    listing=$("$work_libs/ld-linux-x86-64.so.2" --library-path "$work_libs" --list "$binary" 2>&1) ||
        unavailable "$SUITE's loader cannot load perf_analyzer: $listing"
    # The loader falls back to the host's directories for what the folder lacks; a library
    # from there would be one of the old ones, or missing on a clean machine.
    foreign=$(grep '=>' <<<"$listing" | grep -v "=> $work_libs/" || true)
    [ -z "$foreign" ] || unavailable "libraries resolved outside the $SUITE folder (add their packages to PACKAGES): $foreign"
    "$work_libs/ld-linux-x86-64.so.2" --library-path "$work_libs" "$binary" --version >/dev/null 2>&1 ||
        unavailable "perf_analyzer --version fails through $SUITE's loader: $("$work_libs/ld-linux-x86-64.so.2" --library-path "$work_libs" "$binary" --version 2>&1 | head -n 3)"
    mv "$root" "$sysroot"
}

# Whether the host runs the binary with its own libraries.
runs_natively() {
    "$binary" --version >/dev/null 2>&1
}

ready() {
    [ -x "$binary" ] && { [ -d "$sysroot" ] || runs_natively; }
}

prepare() {
    [ "$(uname -m)" = x86_64 ] || unavailable "the pinned binary is for x86_64, this is $(uname -m)"
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock --wait "$LOCK_TIMEOUT_S" 9 || unavailable "$cache/.lock stayed held for ${LOCK_TIMEOUT_S} s"
    # Another run may have prepared everything while this one waited for the lock.
    if ! ready; then
        local work
        work=$(mktemp -d "$cache/.work.XXXXXX")
        # shellcheck disable=SC2064  # expand $work now: it is local to this function
        trap "rm -rf '$work'" EXIT
        [ -x "$binary" ] || fetch_binary "$work"
        [ -d "$sysroot" ] || runs_natively || build_sysroot "$work"
        rm -rf "$work"
        trap - EXIT
    fi
    exec 9>&-
}

ready || prepare
# Through trixie's loader once there is a trixie folder (a host that needed it once still
# does), else as it is.
if [ -d "$sysroot" ]; then
    launcher=("$loader" --library-path "$libs" --argv0 perf_analyzer "$binary")
else
    launcher=("$binary")
fi
if [ $# -eq 1 ] && [ "$1" = --prepare ]; then
    version=$("${launcher[@]}" --version 2>&1) || unavailable "'perf_analyzer --version' fails: $version"
    echo "perf-analyzer $PA_VERSION ready (it says: $version); runs as: ${launcher[*]}"
    exit 0
fi
# --foreground: perf_analyzer stays in the caller's process group, so Ctrl-C reaches it.
exec timeout --foreground --kill-after=10 "${PERF_ANALYZER_TIMEOUT_S:-900}" "${launcher[@]}" "$@"
