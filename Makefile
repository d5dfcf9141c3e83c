# pgmfa — build, test, run and benchmark.
#
#   make run      scratch PostgreSQL + demo user + proxy in the foreground
#   make test     every test (installs PostgreSQL 15 from apt and the 13-18
#                 server builds of the version matrix when missing)
#   make bench    the benchmark suite (installs pgbouncer when missing)
#   make lint     staticcheck, deadcode, go mod tidy -diff (fails on findings)
#   make race     the race detector on the packages where it is affordable

GO        ?= go
# The binary lives beside its package (ignored by git), so the top level
# holds only the agreed layout.
BIN       := cmd/pgmfa/bin/pgmfa
DEMO      := cmd/pgmfa-demo/bin/pgmfa-demo
PGBIN     ?= $(firstword $(wildcard /usr/lib/postgresql/15/bin) $(wildcard /usr/lib/postgresql/*/bin))
TESTFLAGS ?=
BENCHFLAGS ?=
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: all build test test-short vet lint race check-deps generate run bench bench-smoke fuzz deps deps-pg deps-pg-servers deps-clang deps-bench deps-prometheus deps-clients deps-chromium clean

all: build

# Without cgo: pgmfa drops its capabilities on every thread after start-up
# (syscall.AllThreadsSyscall), which the Go runtime refuses in a cgo binary.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN) ./cmd/pgmfa

vet:
	$(GO) vet ./...

# Linters, installed by this Makefile at pinned versions (CI starts bare),
# each version in a directory of its own so a pin change reinstalls.
STATICCHECK_VERSION := v0.8.2
DEADCODE_VERSION    := v0.52.0
TOOLS       := $(firstword $(subst :, ,$(shell $(GO) env GOPATH)))/pgmfa-tools
STATICCHECK := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)/staticcheck
DEADCODE    := $(TOOLS)/deadcode-$(DEADCODE_VERSION)/deadcode

$(STATICCHECK):
	GOBIN=$(dir $@) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

$(DEADCODE):
	GOBIN=$(dir $@) $(GO) install golang.org/x/tools/cmd/deadcode@$(DEADCODE_VERSION)

# Fails on any finding. deadcode's deliberate exceptions, each with its
# reason, are in .ci/deadcode.allow.
lint: vet $(STATICCHECK) $(DEADCODE)
	@bad=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$bad" ]; then echo "gofmt: not formatted: $$bad"; exit 1; fi
	$(GO) mod tidy -diff
	$(STATICCHECK) ./...
	bash .ci/deadcode $(DEADCODE)

# The race detector where it is affordable on two cores: the pure packages,
# the relay, the spare-connection pool, the admin API and the command's own tests.
RACEPKGS ?= ./proto/... ./mfa/... ./loop/relay ./loop/spare ./bpf/epoll ./loop/admin ./cmd/pgmfa
race: deps-pg
	$(GO) test -race -count=1 -timeout 20m $(RACEPKGS)

# The shipped binary must not link the test framework or the cluster
# harness (which runs initdb as the postgres user): those belong to tests
# and to pgmfa-demo.
check-deps:
	@bad=$$($(GO) list -deps ./cmd/pgmfa | grep -E '^testing($$|/)|/bench/' || true); \
	if [ -n "$$bad" ]; then echo "cmd/pgmfa links test-only packages:"; echo "$$bad"; exit 1; fi

# The whole suite. Tests that need root, BPF or PostgreSQL skip with a reason
# elsewhere; under CI=true they must run.
test: deps-pg deps-pg-servers deps-bench deps-prometheus deps-clients deps-chromium build vet check-deps
	$(GO) test -count=1 -timeout 40m $(TESTFLAGS) ./...

# The pure packages alone: fast, no PostgreSQL, no root.
test-short:
	$(GO) test -count=1 -short ./proto/... ./mfa/...

# Long fuzzing runs stay out of `make test` (which replays the seed corpus).
FUZZTIME ?= 2m
# Every package with a Fuzz target, found by searching the test files, so a
# new target is fuzzed without editing this list.
FUZZPKGS = $(sort $(patsubst %/,%,$(dir $(shell grep -rl --include='*_test.go' '^func Fuzz' .))))
fuzz:
	@test -n "$(FUZZPKGS)" || { echo "no Fuzz targets found"; exit 1; }
	@for pkg in $(FUZZPKGS); do \
	  for f in $$($(GO) test -list 'Fuzz.*' $$pkg | grep ^Fuzz); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# Regenerate the BPF objects (committed, so plain builds need no clang).
generate: deps-clang
	$(GO) generate ./bpf/...

run: deps-pg build
	$(GO) build -o $(DEMO) ./cmd/pgmfa-demo
	./$(DEMO) --pgmfa $(BIN)

bench: deps-pg deps-bench build
	$(GO) run ./bench $(BENCHFLAGS)

bench-smoke: deps-pg deps-bench build
	$(GO) run ./bench -smoke $(BENCHFLAGS)

deps: deps-pg deps-pg-servers

deps-pg:
	@if [ -z "$(PGBIN)" ] || ! command -v psql >/dev/null || ! command -v pgbench >/dev/null; then \
	  echo "installing PostgreSQL (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null; \
	fi

# PostgreSQL 13, 14, 16, 17 and 18 server builds for the version matrix,
# from the npm registry into a cache outside the repository (see the script);
# a no-op when present.
deps-pg-servers:
	@bash bench/pgcluster/install-servers.sh

deps-clang:
	@command -v clang >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang llvm libbpf-dev >/dev/null; }

deps-bench:
	@command -v pgbouncer >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }

# Prometheus and promtool, for the metrics tests (a real server scrapes
# pgmfa; promtool checks a scrape).
deps-prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# Client drivers other than libpq and pgx, for the --auth accounts tests:
# psycopg2 (for Debian's /usr/bin/python3) and the PostgreSQL JDBC driver
# (Debian packages), and node-postgres from the npm registry at a pinned
# version into a cache directory outside the repository (Debian's node-pg
# conflicts with a nodesource nodejs); cmd/pgmfa's tests load it from there.
NODE_PG_VERSION := 8.23.1
NODE_PG_DIR     := /var/cache/pgmfa/node
deps-clients:
	@{ /usr/bin/python3 -c 'import psycopg2' && test -f /usr/share/java/postgresql.jar && command -v java; } >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-psycopg2 libpostgresql-jdbc-java default-jdk-headless >/dev/null; }
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@grep -qs '"version": "$(NODE_PG_VERSION)"' $(NODE_PG_DIR)/node_modules/pg/package.json || npm install --silent --no-audit --no-fund --prefix $(NODE_PG_DIR) pg@$(NODE_PG_VERSION)

# Headless Chromium (Debian's package), for the approval page's browser
# test (cmd/pgmfa, chromedp with a virtual WebAuthn authenticator).
deps-chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf cmd/pgmfa/bin cmd/pgmfa-demo/bin
