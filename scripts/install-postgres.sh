#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for the tests that need a real PostgreSQL
# (labelloop_tests/pg.py starts a private throwaway server from them; see that module).
# Idempotent and quiet: returns at once when /usr/lib/postgresql/<version>/bin/initdb exists.
# Needs root (as in CI); never prompts (CI runs with no standard input). It installs only the
# binaries: no cluster is created or started (Debian's postinst would create and start one named
# "main"; create_main_cluster is switched off for the duration of the install, then the file is
# put back byte for byte).
#
# LABELLOOP_PG_LIBDIR (default /usr/lib/postgresql) is where the binaries are looked for.
set -euo pipefail

LIBDIR="${LABELLOOP_PG_LIBDIR:-/usr/lib/postgresql}"

found() {
    { ls -d "$LIBDIR"/*/bin/initdb 2>/dev/null || true; } | sort -V | tail -n 1
}

if initdb="$(found)" && [ -n "$initdb" ]; then
    echo "install-postgres: $("$initdb" --version 2>/dev/null || echo "$initdb") already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-postgres: PostgreSQL's server binaries ($LIBDIR/*/bin/initdb) are missing, and" \
         "installing them needs root: run 'sudo bash scripts/install-postgres.sh'" \
         "(or 'apt-get install postgresql' yourself), or point LABELLOOP_TEST_PG at a server" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-postgres: no apt-get here; install PostgreSQL's server (initdb, pg_ctl, postgres)" \
         "with your system's package manager, or point LABELLOOP_TEST_PG at a server" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
APT_INSTALL=(apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold)

apt-get update -qq
# The metapackage "postgresql" depends on the distribution's current server (postgresql-15 on
# Debian 12); installing that server package directly is the same as installing the metapackage.
server="$(apt-cache depends postgresql 2>/dev/null | awk '/Depends: postgresql-[0-9]+$/ && !n++ {print $2}' || true)"
server="${server:-postgresql}"

# postgresql-common first: it owns createcluster.conf, whose create_main_cluster decides whether
# the server package's postinst creates (and starts) a "main" cluster.
"${APT_INSTALL[@]}" postgresql-common </dev/null
conf=/etc/postgresql-common/createcluster.conf
saved="$(mktemp)"
cp -p "$conf" "$saved"
restore() { cp -p "$saved" "$conf"; rm -f "$saved"; }
trap restore EXIT
pg_conftool "$conf" set create_main_cluster off
"${APT_INSTALL[@]}" "$server" </dev/null

initdb="$(found)"
if [ -z "$initdb" ]; then
    echo "install-postgres: installed $server but found no $LIBDIR/*/bin/initdb" >&2
    exit 1
fi
echo "install-postgres: $("$initdb" --version) installed ($server; no cluster created)"
