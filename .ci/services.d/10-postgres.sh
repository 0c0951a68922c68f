# PostgreSQL for the registry tests (tests/deploy): the Debian server package. The tests start
# and stop their own throwaway cluster (initdb + pg_ctl in a temp dir, unix socket only, as the
# `postgres` user when run as root), so this only installs the binaries and starts nothing.
# Sourced by .ci/services (see its header): check each command, `return 1` on failure.
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    echo "postgres: server binaries present ($(ls /usr/lib/postgresql 2>/dev/null))"
    return 0
fi
_sudo=""
if [ "$(id -u)" -ne 0 ]; then _sudo="sudo"; fi
DEBIAN_FRONTEND=noninteractive $_sudo apt-get update -qq || return 1
DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq --no-install-recommends postgresql \
    >/dev/null || return 1
# the package's own cluster is not needed: stop it so it holds no port or memory
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _rest; do
        $_sudo pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
fi
echo "postgres: installed $(ls /usr/lib/postgresql)"
unset _sudo
